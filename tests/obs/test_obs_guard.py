"""obs.guard: GPTQ's rows are kept only where their error on held-out inputs is at most round-to-nearest's."""

import torch
from obs_fixtures import correlated_layer

import brainsurgeon as bs
from brainsurgeon.obs import compress_weight
from brainsurgeon.obs.guard import guard_rows, heldout_error


def _layer():
    W, H = correlated_layer(24, 32, n=48, seed=3)  # n > cols: H full rank, GPTQ fits it
    g = torch.Generator().manual_seed(7)
    L = torch.linalg.cholesky(H / 2 + 1e-9 * torch.eye(32, dtype=H.dtype))
    X = torch.randn(200, 32, generator=g, dtype=torch.float64) @ L.T  # new draws like the calibration's ...
    X += 0.05 * torch.randn(200, 32, generator=g, dtype=torch.float64)  # ... plus directions it barely excites
    W_q = compress_weight(W, H, bs.GPTQ(bits=3, decouple=0)).weight
    W_r = compress_weight(W, None, bs.RTN(bits=3)).weight
    return W, W_q, W_r, X


def test_guarded_rows_are_never_worse_than_rtn_on_the_heldout_inputs():
    W, W_q, W_r, X = _layer()
    W_g, worse = guard_rows(W, W_q, W_r, X)
    e_g, e_q, e_r = (heldout_error(W, V, X) for V in (W_g, W_q, W_r))
    assert 0 < int(worse.sum()) < len(worse)  # the fixture exercises both cases
    assert torch.all(e_g <= e_r * (1 + 1e-12))  # row by row, hence the layer
    assert torch.equal(e_g, torch.minimum(e_q, e_r))
    assert torch.equal(W_g[~worse], W_q[~worse]) and torch.equal(W_g[worse], W_r[worse])


def test_heldout_error_is_the_output_error():
    W, W_q, _, X = _layer()
    assert torch.allclose(heldout_error(W, W_q, X), ((X @ (W_q - W).T) ** 2).sum(0))
