"""The verbs: per-layer plans, bad inputs give clear errors, and the model is untouched on failure."""

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon import api
from brainsurgeon.errors import CalibrationError, ConfigError, UnsupportedModuleError


class TwoLayer(nn.Module):
    def __init__(self, branch: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.unused = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def calib(n=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_untouched(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sparsify_reaches_sparsity_and_reports_each_layer():
    m = TwoLayer()
    rep = bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), calib(), ignore=("unused",))
    assert [r.name for r in rep.rows] == ["fc1", "fc2"]
    for lin in (m.fc1, m.fc2):
        assert (lin.weight == 0).sum() == lin.weight.numel() // 2
    assert rep.totals()["sparsity"] == pytest.approx(0.5)
    assert "fc1" in rep.to_table() and '"rows"' in rep.to_json()


def test_overrides_first_match_wins_and_ignore_skips():
    m = TwoLayer()
    before = m.fc2.weight.clone()
    rep = bs.quantize_(m, bs.RTN(bits=4), calib(), ignore=("fc2", "unused"), overrides={"fc.": bs.RTN(bits=2)})
    assert [(r.name, r.bits) for r in rep.rows] == [("fc1", 2.0)]
    assert torch.equal(m.fc2.weight, before)
    assert rep.rows[0].levels <= 4


def test_wrong_verb_config():
    with pytest.raises(ConfigError, match="sparsify_ needs a sparsify config"):
        bs.sparsify_(TwoLayer(), bs.OBQ(bits=4), calib())


def test_empty_and_nan_calibration_leave_model_untouched():
    m = TwoLayer()
    before = snapshot(m)
    with pytest.raises(CalibrationError, match="empty"):
        bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), [], ignore=("unused",))
    bad = calib()
    bad[1][0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="fc1"):
        bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), bad, ignore=("unused",))
    assert_untouched(m, before)


def test_layer_never_reached_names_it_and_the_fix():
    m = TwoLayer()
    before = snapshot(m)
    with pytest.raises(CalibrationError, match=r"unused.*ignore"):
        bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), calib())
    assert_untouched(m, before)


def test_non_float_weight_is_refused_before_any_change():
    m = TwoLayer()
    m.unused.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int32), requires_grad=False)
    with pytest.raises(UnsupportedModuleError, match=r"unused.*not floating point"):
        bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), calib())


def test_pattern_not_dividing_layer_is_refused_up_front_when_strict():
    m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 6), nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"layer 2: input features = 6 .* group size 4"):
        bs.sparsify_(m, bs.ExactOBS(pattern="2:4"), calib(), options=bs.CalibOptions(strict=True))


def test_failure_midway_restores_every_layer(monkeypatch):
    m = TwoLayer()
    before = snapshot(m)
    real = api.compress_weight

    def flaky(W, H, cfg, name=""):
        if name == "fc2":
            raise RuntimeError("solver crashed")
        return real(W, H, cfg, name)

    monkeypatch.setattr(api, "compress_weight", flaky)
    with pytest.raises(RuntimeError, match="crashed"):
        bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), calib(), ignore=("unused",))
    assert_untouched(m, before)


def test_leaves_no_trace():
    m = TwoLayer().train()
    bs.quantize_(m, bs.GPTQ(bits=4), calib(), ignore=("unused",))
    assert m.training and all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in m.modules())
    assert all(p.requires_grad for p in m.parameters())


def test_grouped_conv_is_solved_per_group():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
    x = [torch.randn(8, 4, 6, 6) for _ in range(3)]
    rep = bs.sparsify_(m, bs.ExactOBS(pattern="1:2"), x)
    w = m[0].weight  # out 8 x in/g 2 x 3 x 3: groups of 2 input channels keep 1
    assert ((w != 0).sum(1) == 1).all()
    assert rep.rows[0].shape == (8, 2, 3, 3)
