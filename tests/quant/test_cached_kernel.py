"""The quantized kernels cache transposed/prepacked codes: loading new buffers or moving the module must
drop that cache, or the layer would keep computing with the old weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.quant.dynamic import DynamicInt8Linear
from brainsurgeon.quant.packed import CachedKernel, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from brainsurgeon.quant.static import StaticInt8Linear, convert_static_int8_


def _static(seed: int) -> StaticInt8Linear:
    torch.manual_seed(seed)
    model, x = nn.Sequential(nn.Linear(32, 16)), [torch.randn(8, 32)]
    bs.quantize_(model, bs.ActQuant(bits=8), x)
    bs.quantize_(model, bs.RTN(bits=8, sym=True), x)
    convert_static_int8_(model)
    return model[0]


def _make(kind: str, seed: int) -> CachedKernel:
    torch.manual_seed(seed)
    lin = nn.Linear(32, 16)
    if kind == "int8":
        return Int8WeightOnlyLinear.from_linear(lin, bits=8, rtn=True, compute_dtype="float32")
    if kind == "int4":
        return Int4WeightOnlyLinear.from_linear(lin, bits=4, group_size=32, rtn=True, compute_dtype="float32")
    if kind == "dynamic":
        return DynamicInt8Linear.from_linear(lin, rtn=True)
    return _static(seed)


@pytest.mark.parametrize("kind", ["int8", "int4", "dynamic", "static"])
def test_loading_new_buffers_or_moving_drops_the_kernel_cache(kind):
    a, b = _make(kind, 0), _make(kind, 1)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before, want = a(x), b(x)
        assert not torch.equal(before, want)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), want)  # not the cached codes of the old weights
        a.to(torch.device("cpu"))
        assert not a._cache and torch.equal(a(x), want)
    assert a.nbytes() == sum(t.numel() * t.element_size() for t in a.state_dict().values())
