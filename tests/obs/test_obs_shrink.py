"""GPTQ's Hessian shrinkage toward its diagonal, H' = (1 - l) H + l diag(H): l = 0 is plain GPTQ, l = 1 is RTN."""

import pytest
import torch
from obs_fixtures import correlated_layer

from brainsurgeon.config import GPTQ, RTN, ConfigError
from brainsurgeon.obs import compress_weight
from brainsurgeon.obs.hessian import shrink_


@pytest.mark.parametrize("act_order,group_size", [(True, 16), (False, 16), (True, 0)])
def test_shrink_zero_is_plain_gptq_and_one_is_rtn_on_the_same_grid(act_order, group_size):
    W, H = correlated_layer(24, 64)
    kw = {"bits": 4, "group_size": group_size, "act_order": act_order, "blocksize": 16}
    plain = compress_weight(W, H, GPTQ(**kw, shrink=0.0))
    H0 = H.clone()
    torch.testing.assert_close(shrink_(H0, 0.0), H, rtol=0, atol=0)
    # a bare H (no calibration driver to estimate the intensity): "auto" shrinks nothing
    assert torch.equal(compress_weight(W, H, GPTQ(**kw)).weight, plain.weight)
    diag = compress_weight(W, H, GPTQ(**kw, shrink=1.0)).weight  # diagonal H: no error is spread
    rtn = compress_weight(W, None, RTN(bits=4, group_size=group_size)).weight
    torch.testing.assert_close(diag, rtn, rtol=0, atol=1e-6)
    half = compress_weight(W, H, GPTQ(**kw, shrink=0.5))
    Hs = 0.5 * H + 0.5 * torch.diag(H.diagonal())
    torch.testing.assert_close(half.weight, compress_weight(W, Hs, GPTQ(**kw, shrink=0.0)).weight, rtol=0, atol=1e-6)
    assert not torch.equal(half.weight, plain.weight)
    assert plain.loss <= half.loss * (1 + 1e-6)  # on the calibration H the unshrunk solve fits best


def test_shrink_keeps_the_diagonal_and_scales_the_rest():
    H = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    torch.testing.assert_close(shrink_(H.clone(), 0.25), torch.tensor([[4.0, 1.5], [1.5, 9.0]], dtype=torch.float64))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "on", True])
def test_shrink_is_validated(bad):
    with pytest.raises(ConfigError, match="shrink"):
        GPTQ(shrink=bad)
