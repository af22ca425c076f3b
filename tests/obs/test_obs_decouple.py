"""GPTQ's `decouple`: input columns with H_jj > k median(diag H) (massive activations) are rounded to nearest and
take no part in the error feedback; off (0) or with no such column it is plain GPTQ."""

import pytest
import torch
from obs_fixtures import correlated_layer

from brainsurgeon.config import GPTQ, RTN, ConfigError
from brainsurgeon.obs import compress_weight
from brainsurgeon.obs.hessian import decouple_

KW = {"bits": 4, "group_size": 16, "blocksize": 16, "shrink": 0.0}


def massive_layer(rows: int = 24, cols: int = 64, massive: tuple[int, ...] = (5, 40)):
    """A correlated layer whose `massive` inputs are 100x larger on 1/16 of the tokens (like <s>/</s>)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                 dtype=torch.float64) / cols**0.5
    for j in massive:
        X[::16, j] *= 100.0
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, 2 * X.T @ X / len(X)


def test_decouple_zeroes_the_massive_rows_and_columns_off_the_diagonal():
    H = torch.tensor([[1.0, 0.5, 0.2], [0.5, 900.0, 3.0], [0.2, 3.0, 2.0]], dtype=torch.float64)
    out = H.clone()
    big = decouple_(out, 100.0)  # median 2: column 1 (900 > 200) only
    assert big.tolist() == [False, True, False]
    want = torch.tensor([[1.0, 0.0, 0.2], [0.0, 900.0, 0.0], [0.2, 0.0, 2.0]], dtype=torch.float64)
    assert torch.equal(out, want)
    same = H.clone()
    assert not decouple_(same, 1000.0).any() and torch.equal(same, H)  # nothing above the threshold: unchanged


@pytest.mark.parametrize("act_order", [True, False])
def test_decouple_off_or_without_massive_columns_is_plain_gptq(act_order):
    W, H = correlated_layer(24, 64)  # power-law spectrum, diag within a small factor of its median
    plain = compress_weight(W, H, GPTQ(**KW, act_order=act_order))
    assert H.diagonal().max() < 10 * H.diagonal().median()
    high = compress_weight(W, H, GPTQ(**KW, act_order=act_order, decouple=10.0))
    assert torch.equal(high.weight, plain.weight) and high.info["decoupled"] == 0
    assert plain.info["decoupled"] == 0


def test_decoupled_columns_are_round_to_nearest_and_the_rest_is_gptq_on_the_decoupled_h():
    W, H = massive_layer()
    cfg = GPTQ(**KW, act_order=True, decouple=50.0)
    res = compress_weight(W, H, cfg)
    assert res.info["decoupled"] == 2
    Hd = H.clone()
    decouple_(Hd, 50.0)
    torch.testing.assert_close(res.weight, compress_weight(W, Hd, GPTQ(**KW, act_order=True)).weight, rtol=0, atol=0)
    rtn = compress_weight(W, None, RTN(bits=4, group_size=16)).weight  # the same (static, up-front) grid
    for j in (5, 40):  # no error spread onto them, none from them
        torch.testing.assert_close(res.weight[:, j], rtn[:, j], rtol=0, atol=1e-6)
    plain = compress_weight(W, H, GPTQ(**KW, act_order=True))
    assert not torch.equal(plain.weight[:, [5, 40]], rtn[:, [5, 40]])  # plain GPTQ spreads error onto the later one
    # the other columns still get GPTQ's compensation: better than RTN on the calibration H
    assert res.loss < compress_weight(W, H, RTN(bits=4, group_size=16)).loss


@pytest.mark.parametrize("bad", [-1.0, 0.5])
def test_decouple_is_validated(bad):
    with pytest.raises(ConfigError, match="decouple"):
        GPTQ(decouple=bad)
