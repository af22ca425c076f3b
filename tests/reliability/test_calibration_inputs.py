"""Bugs 13.#11 (calibration that doesn't fit the model), 13.#7 (one-shot generators), 13.#9 (degenerate data)."""

import pytest
import torch
from reliability_state import assert_untouched, capture
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import CalibrationError, UnsupportedModuleError


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def batches(n=3, c=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, c, 6, 6, generator=g).to(dtype) for _ in range(n)]


def test_fp16_calibration_on_an_fp32_model_is_cast_with_a_note():
    a, b = CNN().eval(), CNN().eval()
    rep = bs.quantize_(a, bs.GPTQ(bits=4), batches(dtype=torch.float16))
    bs.quantize_(b, bs.GPTQ(bits=4), [x.float() for x in batches(dtype=torch.float16)])
    assert torch.equal(a.conv1.weight, b.conv1.weight) and torch.equal(a.fc.weight, b.fc.weight)
    assert any("calibration batches are float16 but the model is float32: cast" in n for n in rep.notes)


def test_fp32_calibration_on_a_bf16_model_is_cast_with_a_note():
    m = CNN().eval().to(torch.bfloat16)
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), batches())
    assert m.conv1.weight.dtype == torch.bfloat16 and (m.fc.weight == 0).float().mean() == 0.5
    assert any("float32 but the model is bfloat16" in n for n in rep.notes)


@pytest.mark.parametrize("verb", ["sparsify_", "quantize_", "compress"])
def test_wrong_channel_count_names_expected_received_and_fix(verb):
    m = CNN().eval()
    before = capture(m)
    run = {"sparsify_": lambda c: bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), c),
           "quantize_": lambda c: bs.quantize_(m, bs.GPTQ(bits=4), c),
           "compress": lambda c: bs.compress(m, bs.Recipe((bs.config.Step(bs.ChannelPruning(ratio=0.5)),)), c)}[verb]
    with pytest.raises(CalibrationError, match=rf"{verb}: the model's forward failed on the first calibration batch "
                                               r"\[\(4, 1, 6, 6\) float32 cpu\].*conv1 is a Conv2d with 3 input "
                                               r"channels.*Fix the calibration data"):
        run(batches(c=1))
    assert_untouched(m, before)


def test_a_meta_device_model_is_refused_up_front():
    with torch.device("meta"):
        m = CNN()
    with pytest.raises(UnsupportedModuleError, match="meta device.*Load the weights first"):
        bs.quantize_(m, bs.RTN(bits=4), batches())


@pytest.mark.parametrize("flag", ["bn_reestimate", "correct_mean_std"])
def test_a_generator_works_with_recalibration(flag):
    opts = bs.CalibOptions(**{flag: True})
    a, b = CNN().eval(), CNN().eval()
    rep = bs.sparsify_(a, bs.ExactOBS(sparsity=0.5), (x for x in batches()), options=opts)
    bs.sparsify_(b, bs.ExactOBS(sparsity=0.5), batches(), options=opts)
    assert torch.equal(a.bn1.running_mean, b.bn1.running_mean) and torch.equal(a.fc.weight, b.fc.weight)
    assert any("one-shot iterator: its 3 batches were read once and kept" in n for n in rep.notes)


def test_a_generator_works_in_a_two_step_recipe():
    m = CNN().eval()
    recipe = bs.Recipe((bs.config.Step(bs.ExactOBS(sparsity=0.5)), bs.config.Step(bs.GPTQ(bits=4))),
                       bs.CalibOptions(bn_reestimate=True))
    rep = bs.compress(m, recipe, (x for x in batches()))
    assert [r.name for r in rep.rows] == ["conv1", "fc", "conv1", "fc"]


def test_an_exhausted_generator_is_a_calibration_error():
    g = (x for x in batches())
    list(g)
    m = CNN().eval()
    before = capture(m)
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), g)
    assert_untouched(m, before)


# ----------------------------------------------------------------- 13.#9 degenerate calibration


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.mark.parametrize("cfg", [bs.GPTQ(bits=4), bs.OBQ(bits=4), bs.ExactOBS(sparsity=0.5),
                                 bs.SparseGPT(sparsity=0.5)])
def test_all_zero_inputs_never_give_a_silent_zero_layer(cfg):
    m = _mlp().eval()
    verb = bs.quantize_ if cfg.verb == "quantize" else bs.sparsify_
    rep = verb(m, cfg, [torch.zeros(8, 16) for _ in range(2)])
    W = m[0].weight
    if cfg.verb == "quantize":
        assert (W != 0).float().mean() > 0.5 and rep.rows[0].levels <= 16
    else:
        assert (W == 0).float().mean() == 0.5
    assert any("layer 0: every one of its 16 inputs is zero" in n and "instead" in n for n in rep.notes)


def test_mostly_dead_inputs_warn_in_the_report():
    m = _mlp().eval()
    x = torch.randn(8, 16)
    x[:, 4:] = 0  # 75 % of the inputs are dead
    rep = bs.quantize_(m, bs.GPTQ(bits=4), [x, x])
    assert any("layer 0: 75% of its 16 inputs are zero on the calibration data" in n for n in rep.notes)
