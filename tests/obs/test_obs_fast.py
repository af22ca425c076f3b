"""obs.fast: the blocked float32 walk on W^T equals the textbook one-column-at-a-time float64 algorithm."""

import pytest
import torch
from obs_fixtures import correlated_layer

from brainsurgeon.config import GPTQ, Magnitude, SparseGPT
from brainsurgeon.obs import compress_weight
from brainsurgeon.obs.hessian import inverse_factor, prepare
from brainsurgeon.quant.grid import fit_grid, quantize


def textbook_gptq(W, H, cfg):
    """GPTQ (Frantar et al. 2023, Algorithm 1) without lazy blocks, in float64, static groups."""
    H = H + cfg.damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    perm = torch.argsort(torch.diagonal(H), descending=True) if cfg.act_order else torch.arange(len(H))
    grid = fit_grid(W, cfg.bits, cfg.sym, cfg.group_size, cfg.mse)
    scale, zero = (t[:, perm] for t in grid.columns(W.shape[1]))
    U = torch.linalg.cholesky(torch.linalg.inv(H)[perm][:, perm], upper=True)
    W = W[:, perm].clone()
    for j in range(W.shape[1]):
        q = quantize(W[:, j], scale[:, j], zero[:, j], grid.maxq)
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        W[:, j] = q
    out = torch.empty_like(W)
    out[:, perm] = W
    return out


@pytest.mark.parametrize("act_order,group_size", [(True, 0), (True, 16), (False, 0)])
def test_fast_gptq_equals_the_textbook_loop(act_order, group_size):
    W, H = correlated_layer(24, 64)
    cfg = GPTQ(bits=4, group_size=group_size, act_order=act_order, mse=False, blocksize=16)
    ref = textbook_gptq(W, H, cfg)
    res = compress_weight(W, H, cfg)
    same = (res.weight == ref.to(res.weight.dtype)) | ((res.weight - ref).abs() < 1e-5)
    assert same.float().mean() > 0.99  # float32 round-off may flip a rare tie to its neighbour
    D = lambda V: V - W  # noqa: E731
    loss_ref = torch.sum((D(ref) @ H) * D(ref)).item()
    assert res.loss == pytest.approx(loss_ref, rel=2e-2)


def test_inverse_factor_is_the_cholesky_of_the_permuted_inverse():
    W, H = correlated_layer(8, 48)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float64, torch.float32):
        prep = prepare(W, H, 0.01, dtype, factor=False)
        U = inverse_factor(prep, perm)
        ref = torch.linalg.cholesky(torch.linalg.inv(prep.H.double())[perm][:, perm], upper=True)
        assert torch.equal(U, U.triu()) and U.dtype == dtype
        torch.testing.assert_close(U.double(), ref, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=0)
        assert prep.lam == pytest.approx(0.01 * H.diagonal().mean().item())


@pytest.mark.parametrize("cfg", [SparseGPT(sparsity=0.5, blocksize=16), SparseGPT(pattern="2:4", blocksize=16)])
def test_fast_sparsegpt_hits_the_pattern_and_beats_magnitude(cfg):
    W, H = correlated_layer(24, 64)
    res = compress_weight(W, H, cfg)
    zeros = res.weight == 0
    if cfg.pattern == "2:4":
        assert (zeros.reshape(24, 16, 4).sum(-1) == 2).all()
    else:
        assert int(zeros.sum()) == 24 * 64 // 2
    mag = Magnitude(pattern=cfg.pattern, sparsity=cfg.sparsity)
    assert res.loss < compress_weight(W, H, mag).loss
