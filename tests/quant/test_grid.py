"""Quantization grids: levels, symmetric/asymmetric, groups, MSE shrink search."""

import pytest
import torch

from brainsurgeon.quant.grid import fit_grid


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (8, False)])
def test_rows_on_at_most_2_pow_bits_levels(bits, sym):
    W = torch.randn(16, 100, generator=torch.Generator().manual_seed(bits))
    Q = fit_grid(W, bits, sym).quantize(W)
    assert max(row.unique().numel() for row in Q) <= 2**bits


def test_groups_have_their_own_grid():
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    W[:, 32:] *= 100  # second group much larger
    g = fit_grid(W, 4, True, group_size=32)
    assert g.scale.shape == (4, 2) and (g.scale[:, 1] > 10 * g.scale[:, 0]).all()
    Q = g.quantize(W)
    assert ((Q - W)[:, :32].abs() <= g.scale[:, :1] / 2 + 1e-6).all()  # fine grid for the small group


def test_ragged_last_group_and_zero_rows():
    W = torch.randn(3, 70, generator=torch.Generator().manual_seed(1))
    W[1] = 0
    Q = fit_grid(W, 4, False, group_size=32).quantize(W)
    assert Q.shape == W.shape and torch.isfinite(Q).all() and (Q[1] == 0).all()


def test_zero_is_exactly_representable():
    W = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    W[:, ::3] = 0
    for sym in (True, False):
        assert (fit_grid(W, 3, sym).quantize(W)[:, ::3] == 0).all()


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_never_worse_than_min_max(sym):
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(3)) ** 3  # heavy tails
    err = lambda g: (g.quantize(W) - W).abs().pow(2.4).sum(1)  # noqa: E731
    plain, searched = err(fit_grid(W, 3, sym, mse=False)), err(fit_grid(W, 3, sym, mse=True))
    assert (searched <= plain + 1e-6).all() and searched.sum() < 0.9 * plain.sum()


def test_depthwise_grid_is_per_output_channel():
    """A depthwise conv's weight (C, 1, 3, 3) as rows of 9: every channel gets its own 8-bit scale
    (amax / 127.5), so a channel of tiny weights keeps its relative precision (no per-tensor collapse),
    and the error matches torch's per-channel fake-quant up to the tie at the row extreme."""
    torch.manual_seed(0)
    W = torch.randn(32, 1, 3, 3) * torch.logspace(-4, 0, 32)[:, None, None, None]
    rows = W.reshape(32, -1)
    g = fit_grid(rows, bits=8, sym=True, mse=False)
    assert g.scale.shape == (32, 1)
    torch.testing.assert_close(g.scale[:, 0], rows.abs().amax(1) / 127.5)
    Q = g.quantize(rows)
    rel = (Q - rows).norm(dim=1) / rows.norm(dim=1)
    assert rel.max() < 0.01  # per channel; a per-tensor grid would zero the smallest channels (rel = 1)
    s = rows.abs().amax(1) / 127.5
    ref = torch.fake_quantize_per_channel_affine(rows, s, torch.zeros(32, dtype=torch.int32), 0, -128, 127)
    torch.testing.assert_close((Q - rows).norm(dim=1), (ref - rows).norm(dim=1), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 9), (1000, 9), (300, 300)])  # all 80 factors at once; chunked; one at a time
@pytest.mark.parametrize("bits,sym", [(2, False), (4, True), (8, False)])
def test_batched_shrink_search_equals_the_reference_loop(shape, bits, sym):
    """fit_rows scores shrink factors in batches: the same scale and zero, bit for bit, as GPTQ's reference
    loop over the 80 factors (first factor of least error wins per row)."""
    from brainsurgeon.quant.grid import _minmax_params, fit_rows, quantize

    X = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) ** 3
    X[0, 0] = 0.0
    maxq = 2**bits - 1
    xmin, xmax = X.amin(1).clamp(max=0), X.amax(1).clamp(min=0)
    scale, zero = _minmax_params(xmin, xmax, maxq, sym)
    best = torch.full_like(scale, float("inf"))
    for i in range(80):
        s, z = _minmax_params((1 - i / 100) * xmin, (1 - i / 100) * xmax, maxq, sym)
        err = (quantize(X, s[:, None], z[:, None], maxq) - X).abs().pow(2.4).sum(1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    s, z = fit_rows(X, bits, sym, mse=True)
    assert torch.equal(s, scale) and torch.equal(z, zero)
