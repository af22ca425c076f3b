"""calib.hessian.auto_shrinkage: Schaefer-Strimmer's intensity from per-sequence Hessians, applied once."""

import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.calib import HessianAccumulator, auto_shrinkage, layer_columns
from brainsurgeon.calib.hessian import shrinkage_intensity


def brute_force(xs: list[torch.Tensor], first: int) -> float:
    """lambda* on the correlation scale, every per-sample H_b held explicitly (float64)."""
    Hb = torch.stack([2.0 / x.shape[0] * x.double().t() @ x.double() for x in xs])
    d = sum(x.double().square().sum(0) for x in xs[:first]).rsqrt()  # the first batch standardises
    R = Hb * d[:, None] * d
    Rm = R.mean(0)
    off = ~torch.eye(R.shape[1], dtype=torch.bool)
    var = ((R - Rm) ** 2).sum(0)[off].sum() / (len(xs) - 1) / len(xs)
    return min(float(var / Rm[off].square().sum()), 1.0)


@pytest.mark.parametrize("dims", [(6, 5, 8), (6, 12, 8)])  # sequences shorter and longer than the width
def test_intensity_matches_the_explicit_per_sample_formula(dims):
    m, T, C = dims
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(C, C, generator=g)
    xs = [torch.randn(T, C, generator=g) @ mix for _ in range(m)]
    lin = nn.Linear(C, 3)
    with auto_shrinkage(lambda name: True) as applied:
        acc = HessianAccumulator("fc", lin)
        acc.add_input(torch.stack(xs[:3]))  # two batches of sequences (B, T, C)
        acc.add_input(torch.stack(xs[3:]))
        raw = acc._H.clone()
        H = acc.H
    lam = brute_force(xs, 3)
    assert 0.0 < lam < 1.0 and applied == [("fc", pytest.approx(lam, rel=1e-4))]
    expect = (1 - lam) * raw + lam * torch.diag(raw.diagonal())
    torch.testing.assert_close(H, expect, rtol=1e-4, atol=1e-6)
    assert acc.H is H and applied[1:] == []  # applied once


def test_intensity_limits():
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert shrinkage_intensity(H, 5, 5 * 2.0) == 0.0  # every sample equals the mean: no noise
    assert shrinkage_intensity(H, 1, 123.0) == 0.0  # one sample: no spread to measure
    assert shrinkage_intensity(H, 2, 1e6) == 1.0  # noise swamps the correlations
    assert shrinkage_intensity(torch.eye(3), 4, 1.0) == 1.0  # nothing off the diagonal


def test_without_the_context_nothing_is_tracked_or_shrunk():
    lin = nn.Linear(4, 2)
    acc = HessianAccumulator("fc", lin)
    x = torch.randn(3, 5, 4)
    acc.add_input(x)
    cols = x.reshape(-1, 4).double()
    torch.testing.assert_close(acc.H, 2.0 / 15 * cols.t() @ cols)
    assert acc.shrinkage == 0.0 and acc._spread is None


def test_quantize_applies_auto_shrinkage_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    calib = [torch.randn(4, 10, 16) for _ in range(2)]
    auto, zero = (bs.quantize_(m, bs.GPTQ(bits=3, shrink=s), calib) for m, s in
                  ((model, "auto"), (copy.deepcopy(model), 0.0)))
    assert any("shrink='auto'/'heldout': 2 Hessian(s)" in n for n in auto.notes)
    assert not any("shrink=" in n for n in zero.notes)


def test_conv_samples_are_images():
    conv = nn.Conv2d(3, 4, 3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 6, 6, generator=g) * torch.rand(5, 1, 1, 1, generator=g) * 3
    with auto_shrinkage(lambda name: True):
        acc = HessianAccumulator("conv", conv)
        acc.add_input(x)
        H = acc.H
    xs = list(layer_columns(conv, x).reshape(5, 16, 27))  # 16 output positions of 27 columns per image
    assert acc.shrinkage == pytest.approx(brute_force(xs, 5), rel=1e-4) and H.shape == (27, 27)


def spy_select(calls: list, lam: float = 0.375):
    def select(name, module, folds, lam_spread):
        calls.append((name, module, folds, lam_spread))
        return lam
    return select


def test_singular_h_gets_the_heldout_choice_on_alternating_samples():
    """Fewer rows than columns: folds are the even / odd samples in arrival order, across batches."""
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(5, 3, 24, generator=g)  # 5 sequences of 3 tokens: 15 rows < 24 columns
    lin = nn.Linear(24, 4)
    calls = []
    with auto_shrinkage(lambda name: True, spy_select(calls)) as applied:
        acc = HessianAccumulator("fc", lin)
        acc.add_input(xs[:3])  # an odd batch size: the parity carries over
        acc.add_input(xs[3:])
        raw = acc._H.clone()
        H = acc.H
    assert len(calls) == 1 and calls[0][0] == "fc" and calls[0][1] is lin
    (HA, HB), (HB2, HA2) = calls[0][2]
    even, odd = xs[0::2].reshape(-1, 24).double(), xs[1::2].reshape(-1, 24).double()
    torch.testing.assert_close(HA, 2 * even.T @ even / len(even), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(HB, 2 * odd.T @ odd / len(odd), rtol=1e-5, atol=1e-6)
    assert HA2 is HA and HB2 is HB and 0.0 <= calls[0][3] <= 1.0  # Schaefer-Strimmer's lambda passed on
    assert applied == [("fc", 0.375)] and acc.shrinkage == 0.375
    torch.testing.assert_close(H, 0.625 * raw + 0.375 * torch.diag(raw.diagonal()))


def test_enough_rows_keep_schaefer_strimmer_and_free_the_buffer():
    xs = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0))  # 32 rows >= 6 columns
    calls = []
    with auto_shrinkage(lambda name: True, spy_select(calls)) as applied:
        acc = HessianAccumulator("fc", nn.Linear(6, 2))
        acc.add_input(xs)
        assert acc._held is None
        assert acc.H.shape == (6, 6)
    assert calls == [] and applied == [("fc", pytest.approx(brute_force(list(xs), 4), rel=1e-4))]


def test_quantize_picks_by_heldout_loss_on_a_singular_layer_and_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))  # 2nd layer: 24 rows < 64 columns
    calib = [torch.randn(6, 4, 8)]
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    ra, rb = (bs.quantize_(m, bs.GPTQ(bits=3, group_size=16, shrink="heldout"), calib) for m in (a, b))
    assert any("1 with fewer calibration rows than columns (singular H) chosen by held-out loss" in n
               for n in ra.notes)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert ra.notes == rb.notes
    rc = bs.quantize_(c, bs.GPTQ(bits=3, group_size=16), calib)  # the default "auto": no held-out choice
    assert not any("held-out" in n for n in rc.notes) and any("shrink='auto'" in n for n in rc.notes)
