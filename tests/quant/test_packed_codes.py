"""Codes read back from on-grid weights reproduce the weights; off-grid weights are refused clearly."""

import pytest
import torch

from brainsurgeon.config import GPTQ, OBQ
from brainsurgeon.errors import ConfigError
from brainsurgeon.obs import compress_weight
from brainsurgeon.quant.codes import codes_from_grid, recover_codes
from brainsurgeon.quant.grid import fit_grid


@pytest.fixture(autouse=True)
def _one_thread():
    """Small kernels on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)



def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 is +0.0: a signed zero is the same value
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [0, 32, 64])
def test_recovered_codes_reproduce_rtn_weights_bitwise(bits, sym, group_size):
    W = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits + 10 * group_size))
    Wq = fit_grid(W, bits, sym, group_size).quantize(W)
    c = recover_codes(Wq, bits, group_size)
    assert torch.equal(c.dequantize(), Wq)
    assert c.q.min() >= 0 and c.q.max() <= 2**bits - 1
    assert torch.equal(codes_from_grid(W, fit_grid(W, bits, sym, group_size)).dequantize(), Wq)


def test_symmetric_codes_keep_the_midpoint_zero():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    c = recover_codes(fit_grid(W, 4, True).quantize(W), 4, 0)
    assert (c.zero == 8).all()


@pytest.mark.parametrize("cfg", [OBQ(bits=4), OBQ(bits=3, group_size=32), GPTQ(bits=4, group_size=32),
                                 GPTQ(bits=8), GPTQ(bits=4, sym=False, group_size=64, act_order=False)],
                         ids=lambda c: c.describe())
def test_codes_of_obs_solver_outputs_are_exact(cfg):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 128, generator=g)
    W = torch.randn(32, 128, generator=g)
    Wq = compress_weight(W, 2 * X.T @ X / 256, cfg).weight
    c = recover_codes(Wq, cfg.bits, cfg.group_size)
    # the codes are exact; float32(scale) * k may differ from float64 solver arithmetic by 1 ulp
    assert _ulps(c.dequantize(), Wq) <= 1
    assert torch.equal(torch.round(Wq / c.columns()[0]) + c.columns()[1], c.q.float())


def test_a_finer_pack_group_than_the_grid_is_fine():
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    Wq = fit_grid(W, 4, True, 0).quantize(W)  # one grid per row
    assert torch.equal(recover_codes(Wq, 4, 64).dequantize(), Wq)


def test_off_grid_weights_are_refused_with_the_fix():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ConfigError, match=r"layer fc: .*not on a 4-bit grid.*rtn=True"):
        recover_codes(W, 4, 32, name="fc")
    Wq = fit_grid(W, 8, True, 0).quantize(W)  # 8-bit values have too many levels for 4 bits
    with pytest.raises(ConfigError, match="not on a 4-bit grid"):
        recover_codes(Wq, 4, 0)


def test_group_size_must_divide_the_columns():
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64.*divides 64"):
        recover_codes(torch.zeros(4, 64), 4, 48)


def test_all_zero_rows_have_codes():
    W = torch.zeros(4, 32)
    c = recover_codes(W, 4, 0)
    assert torch.equal(c.dequantize(), W)
