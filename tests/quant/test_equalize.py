"""Cross-layer equalization folds exactly (same float function), finds exactly the BN -> act -> conv
pairs whose scaled tensor has one reader, flattens the consumer's input ranges, and survives save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import ConfigError
from brainsurgeon.quant.equalize import ChannelClamp, equalization_scales, equalize_


class Block(nn.Module):
    """stem conv-BN-ReLU6 -> depthwise conv-BN-ReLU -> pointwise conv-BN, + a residual add (not equalizable)
    of the pointwise output into a second pointwise conv, then a head Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pw2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 5)
        with torch.no_grad():
            for bn in (self.stem[1], self.dw[1], self.pw[1]):
                bn.weight.copy_(torch.rand(8) * 3 + 0.05)   # channel ranges spread over ~60x
                bn.bias.copy_(torch.randn(8) * 0.5)
                bn.running_mean.copy_(torch.randn(8) * 0.1)
                bn.running_var.copy_(torch.rand(8) + 0.5)

    def forward(self, x):
        h = self.pw(self.dw(self.stem(x)))
        h = h + self.pw(self.dw(self.stem(x)))  # the pw BN output feeds an add: not a single reader
        return self.head(self.pw2(h).mean((2, 3)))


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]


def test_scales_flatten_a_depthwise_consumer_and_balance_a_dense_one():
    dw = nn.Conv2d(3, 3, 3, groups=3)
    a = torch.tensor([4.0, 1.0, 0.0])
    s = equalization_scales(a, dw, alpha=0.5)
    assert torch.equal(s, torch.tensor([1.0, 0.25, 1.0]))   # a_j / max a; the dead channel untouched
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 4.0]]))
    s = equalization_scales(torch.tensor([4.0, 1.0]), lin, alpha=0.5)
    assert torch.allclose(s, torch.tensor([1.0, 0.25]))     # sqrt(4)/sqrt(1) : sqrt(1)/sqrt(4), max at 1


def test_equalization_keeps_the_float_function_and_finds_exactly_the_single_reader_pairs():
    m, calib = Block().eval(), _calib()
    x = torch.randn(6, 3, 8, 8)
    ref = m(x)
    pairs = equalize_(m, calib, alpha=0.5)
    assert pairs == {"stem.1": "dw.0", "dw.1": "pw.0"}  # pw.1 -> pw2 goes through the add: left alone
    assert isinstance(m.stem[2], ChannelClamp) and isinstance(m.dw[2], nn.ReLU)
    assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-5)


def test_equalization_flattens_the_depthwise_input_ranges():
    m, calib = Block().eval(), _calib()
    got = []
    h = m.dw[0].register_forward_pre_hook(lambda mod, a: got.append(a[0].abs().amax((0, 2, 3))))
    with torch.no_grad():
        m(torch.cat(calib))
        equalize_(m, calib)
        m(torch.cat(calib))
    h.remove()
    before, after = got[0], got[-1]
    live = before > 0
    assert (after[live] / after[live].max()).min() > 0.99          # every live channel spans the same range
    assert (before[live] / before[live].max()).min() < 0.5


def test_equalized_model_survives_save_and_load(tmp_path):
    m, calib = Block().eval(), _calib()
    equalize_(m, calib)
    bs.save(m, str(tmp_path / "ckpt"))
    again = bs.load(str(tmp_path / "ckpt"), Block).eval()
    assert isinstance(again.stem[2], ChannelClamp)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(again(x), m(x))


def test_alpha_is_checked():
    with pytest.raises(ConfigError, match="alpha"):
        equalize_(Block(), _calib(), alpha=1.5)


def test_actquant_equalize_folds_first_through_the_public_verb():
    m, calib = Block().eval(), _calib()
    rep = bs.quantize_(m, bs.ActQuant(bits=8, equalize=0.5), calib)
    assert isinstance(m.stem[2], ChannelClamp)
    assert any("cross-layer equalization: 2 " in n for n in rep.notes)
    assert "CLE 0.5" in bs.ActQuant(equalize=0.5).describe()
    with pytest.raises(ConfigError, match="equalize"):
        bs.ActQuant(equalize=-0.1)
