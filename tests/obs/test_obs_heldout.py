"""obs.heldout.select_shrinkage: the shrinkage intensity of GPTQ chosen by held-out loss over two folds."""

import dataclasses

import pytest
import torch
from obs_fixtures import correlated_layer

from brainsurgeon.calib.shrinkage import fold_hessians
from brainsurgeon.config import GPTQ
from brainsurgeon.obs import compress_weight
from brainsurgeon.obs.heldout import SHRINK_GRID, gptq_solver, select_shrinkage
from brainsurgeon.obs.hessian import layer_loss, shrink_


def gptq_solve(**kw):
    cfg = GPTQ(bits=3, group_size=16, blocksize=16, shrink=0.0, **kw)
    return lambda W, H: compress_weight(W, H, cfg).weight


def folds_of(cols: int, n: int, seed: int = 0):
    """Two folds of n // 2 correlated rows each (fewer rows than columns: singular H)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (q * torch.arange(1, cols + 1) ** -0.5).T
    H = 2 * X.T @ X / n
    return X, fold_hessians(H, n, X[n // 2:])


def test_folds_are_the_halves():
    X, ((HA, HB), (HB2, HA2)) = folds_of(12, 10)
    torch.testing.assert_close(HA, 2 * X[:5].T @ X[:5] / 5)
    torch.testing.assert_close(HB, 2 * X[5:].T @ X[5:] / 5)
    assert HB2 is HB and HA2 is HA


def test_equals_brute_force_on_a_tiny_layer():
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, folds = folds_of(32, 24)
    solve = gptq_solve()
    lam, cv = select_shrinkage(W, folds, solve, (0.5, 0.0, 1.0, 0.25, 0.25))  # unsorted, repeated
    brute = {}
    for x in (0.0, 0.25, 0.5, 1.0):
        tot = 0.0
        for H_fit, H_out in folds:
            Hs = (1 - x) * H_fit + x * torch.diag(H_fit.diagonal())
            tot += layer_loss(W, solve(W, Hs), H_out)[0]
        brute[x] = tot
    assert cv == [brute[x] for x in (0.0, 0.25, 0.5, 1.0)]  # same order, same numbers
    assert lam == min(brute, key=brute.get)
    assert select_shrinkage(W, folds, solve, (0.5, 0.0, 1.0, 0.25)) == (lam, cv)  # deterministic


def fake_solve(best: float):
    """A solver whose held-out loss is (l - best)^2 * const: l read back from the shrunk H's H_01 (1 unshrunk)."""
    return lambda W, H: W + (1.0 - float(H[0, 1]) - best)


def test_picks_what_the_heldout_loss_says_zero_included():
    W = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    HA, HB = torch.tensor([[2.0, 1.0], [1.0, 3.0]]), torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    for best in (0.0, 0.25, 0.75, 1.0):
        lam, cv = select_shrinkage(W, [(HA, HB), (HB, HA)], fake_solve(best))
        assert lam == best and min(cv) < 1e-20 and len(cv) == len(SHRINK_GRID)


def test_ties_go_to_the_smaller_intensity():
    W = torch.randn(4, 8, dtype=torch.float64)
    _, folds = folds_of(8, 6)
    lam, cv = select_shrinkage(W, folds, lambda W, H: W + 1.0)  # every l: the same loss
    assert lam == 0.0 and len(set(cv)) == 1


def test_plenty_of_identical_data_keeps_plain_gptq():
    """Folds that are the same well-sampled H: the held-out loss is the fit loss, plain GPTQ fits best."""
    W, H = correlated_layer(24, 64)
    lam, cv = select_shrinkage(W, [(H, H), (H, H)], gptq_solve(), (0.0, 0.5, 1.0))
    assert lam == 0.0 and cv[0] < cv[1] < cv[2]


def test_rows_are_subsampled_evenly():
    W = torch.randn(40, 16, dtype=torch.float64)
    _, folds = folds_of(16, 10)
    seen = []
    select_shrinkage(W, folds, lambda W, H: seen.append(W.shape) or W, (0.0,), max_rows=8)
    assert seen == [(8, 16), (8, 16)]


@pytest.mark.parametrize("kw", [{"group_size": 16}, {"group_size": 16, "act_order": False}, {"mse": False}])
def test_gptq_solver_is_compress_weight_with_its_grid_reused(kw):
    W, H = correlated_layer(12, 48)
    H[3, :] = H[:, 3] = 0.0  # a dead input: its column zeroed before the grid is fitted
    cfg = GPTQ(bits=3, blocksize=16, **kw)
    solve = gptq_solver(cfg)
    for lam in (0.0, 0.5, 0.0):  # the second 0.0 reuses the grid fitted by the first
        Hs = shrink_(H.clone(), lam)
        ref = compress_weight(W, Hs, dataclasses.replace(cfg, shrink=0.0)).weight
        assert torch.equal(solve(W, Hs), ref)
