"""SmoothQuant folds exactly (same float function), flattens outlier channels, and lowers W8A8 error;
statistics correction runs after activation quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import ConfigError
from brainsurgeon.quant.smooth import smooth_quant_, smoothing_scales


class PreNorm(nn.Module):
    """x -> LN -> (q, k) summed, plus a residual of x (pre-norm: the residual does not read the LN output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(16)
        self.q, self.k = nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(8, 16)
        with torch.no_grad():
            self.ln.weight[3] = 40.0  # an outlier channel, as in LLM activations
            self.ln.bias[5] = 9.0

    def forward(self, x):
        h = self.ln(x)
        return x + self.out(torch.relu(self.q(h) + self.k(h)))


class PostNorm(PreNorm):
    """The LN output is also the residual (BERT's post-norm): folding would change the function."""

    def forward(self, x):
        h = self.ln(x)
        return h + self.out(torch.relu(self.q(h) + self.k(h)))


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=g) for _ in range(3)]


def test_scales_follow_equation_4():
    xa, W = torch.tensor([4.0, 1.0]), torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    s = smoothing_scales(xa, [W], alpha=0.5)
    assert torch.allclose(s, torch.tensor([4.0**0.5 / 1.0**0.5, 1.0 / 2.0**0.5]))


def test_smoothing_keeps_the_function_and_flattens_the_outlier():
    m, calib = PreNorm(), _calib()
    x = calib[0]
    ref = m(x)
    before = m.ln(x).abs().amax(0)
    pairs = smooth_quant_(m, calib, alpha=0.5)
    assert pairs == {"ln": ["k", "q"]}
    assert torch.allclose(m(x), ref, atol=1e-5)
    after = m.ln(x).abs().amax(0)
    assert after.max() / after.median() < before.max() / before.median()


def test_post_norm_residual_is_left_alone():
    m, calib = PostNorm(), _calib()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert smooth_quant_(m, calib, alpha=0.5) == {}
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_smoothquant_lowers_w8a8_error_on_outlier_activations():
    calib, x = _calib(), torch.cat(_calib())
    dense = PreNorm()
    errs = {}
    for alpha in (0.0, 0.5):
        m = PreNorm()
        rep = bs.compress(m, bs.W8A8("RTN", smooth=alpha), calib)
        with torch.no_grad():
            errs[alpha] = float((m(x) - dense(x)).norm() / dense(x).norm())
        assert any("SmoothQuant" in n for n in rep.notes) == (alpha > 0)
    assert errs[0.5] < errs[0.0]
    with pytest.raises(ConfigError, match="smooth"):
        bs.ActQuant(smooth=1.5)


def test_mean_std_correction_runs_after_activation_quantization():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = [torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    recipe = bs.Recipe((bs.Step(bs.ActQuant(bits=3)),), bs.CalibOptions(correct_mean_std=True, bn_reestimate=True))
    rep = bs.compress(model, recipe, calib)
    assert any("mean/std correction on 2 layers" in n for n in rep.notes)
    assert any("BatchNorm statistics re-estimated" in n for n in rep.notes)
