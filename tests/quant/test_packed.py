"""Packed int8/int4 weight-only Linear and packed Conv2d: kernels == dequantized float math, exact bytes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.errors import ConfigError
from brainsurgeon.formats import module_format
from brainsurgeon.quant.codes import recover_codes
from brainsurgeon.quant.dynamic import DynamicInt8Linear
from brainsurgeon.quant.grid import fit_grid
from brainsurgeon.quant.packed import Int4WeightOnlyLinear, Int8WeightOnlyLinear, pack_nibbles, unpack_nibbles
from brainsurgeon.quant.packed_conv import PackedConv2d


@pytest.fixture(autouse=True)
def _one_thread():
    """Small kernels on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)



def _linear(n_in=256, n_out=64, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = [(Int4WeightOnlyLinear, g) for g in (0, 32, 64, 128, 256)] + \
        [(Int8WeightOnlyLinear, g) for g in (0, 32, 128)]


@pytest.mark.parametrize("cls,group_size", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("sym", [True, False])
def test_kernel_forward_equals_dequantized_float_forward(cls, group_size, sym):
    lin = _linear(seed=group_size)
    m = cls.from_linear(lin, group_size=group_size, rtn=True, sym=sym, compute_dtype="float32")
    x = torch.randn(5, 3, 256, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, m.dequantize(), m.bias)
    assert m(x).shape == (5, 3, 64)
    assert _rel(m(x), ref) < 2e-6
    m16 = cls.from_linear(lin, group_size=group_size, rtn=True, sym=sym, compute_dtype="bfloat16")
    assert _rel(m16(x), ref) < 2e-2  # bfloat16 activations: ~3 significant digits


@pytest.mark.parametrize("cls,bits,group_size", [(Int4WeightOnlyLinear, 4, 64), (Int4WeightOnlyLinear, 3, 0),
                                                 (Int8WeightOnlyLinear, 8, 0), (Int8WeightOnlyLinear, 6, 32)])
def test_dequantized_weight_is_the_grid_weight_exactly(cls, bits, group_size):
    lin = _linear()
    W = lin.weight.detach()
    Wq = fit_grid(W, bits, False, group_size).quantize(W)
    m = cls.from_linear(lin, bits=bits, group_size=group_size, rtn=True, sym=False)
    assert torch.equal(m.dequantize(), Wq)
    with torch.no_grad():
        lin.weight.copy_(Wq)  # on-grid float weight -> packed without rounding: the same weights
    assert torch.equal(cls.from_linear(lin, bits=bits, group_size=group_size).dequantize(), Wq)


@pytest.mark.parametrize("n_in,n_out,group_size,bias", [(256, 64, 128, True), (256, 64, 0, False), (64, 32, 32, True)])
def test_bytes_are_exactly_the_format(n_in, n_out, group_size, bias):
    lin = _linear(n_in, n_out, bias=bias)
    G = n_in // (group_size or n_in)
    meta = 2 * n_out * G * 4 + (n_out * 4 if bias else 0)  # float32 scale + zero per (row, group); bias
    m4 = Int4WeightOnlyLinear.from_linear(lin, group_size=group_size, rtn=True)
    m8 = Int8WeightOnlyLinear.from_linear(lin, group_size=group_size, rtn=True)
    assert m4.nbytes() == n_out * n_in // 2 + meta
    assert m8.nbytes() == n_out * n_in + meta
    assert m4.qweight.dtype == torch.uint8 and m4.qweight.shape == (n_out, n_in // 2)
    assert m8.qweight.dtype == torch.int8 and m8.qweight.shape == (n_out, n_in)


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (7, 10), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    b = pack_nibbles(q)
    assert b.shape == (7, 5) and torch.equal(unpack_nibbles(b), q)
    assert int(b[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble = even column


@pytest.mark.parametrize("n_in,n_out,group_size,match", [
    (256, 40, 128, r"out_features % 16 == 0.*40 % 16 = 8.*bits=8"),
    (48, 64, 0, r"in_features % 32 == 0.*48 % 32 = 16"),
    (256, 64, 16, r"group_size=16 is not supported by the int4 kernel.*\[32, 64, 128, 256\]"),
])
def test_int4_odd_shapes_are_rejected_with_the_rule_and_fix(n_in, n_out, group_size, match):
    with pytest.raises(ConfigError, match=match):
        Int4WeightOnlyLinear.from_linear(_linear(n_in, n_out), group_size=group_size, rtn=True)


def test_int8_group_must_divide_in_features():
    with pytest.raises(ConfigError, match=r"group_size=100 does not divide in_features=256"):
        Int8WeightOnlyLinear.from_linear(_linear(), group_size=100, rtn=True)


def test_bad_compute_dtype_is_rejected():
    with pytest.raises(ConfigError, match=r"compute_dtype='int8'.*allowed"):
        Int8WeightOnlyLinear(256, 64, compute_dtype="int8")


@pytest.mark.parametrize("make", [
    lambda lin: Int4WeightOnlyLinear.from_linear(lin, group_size=64, rtn=True, sym=False),
    lambda lin: Int8WeightOnlyLinear.from_linear(lin, group_size=32, rtn=True),
    lambda lin: DynamicInt8Linear.from_linear(lin, rtn=True),
], ids=["int4", "int8", "dynamic"])
def test_spec_and_state_dict_round_trip(make, tmp_path):
    from safetensors.torch import load_file, save_file

    m = make(_linear())
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    y = m(x)
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))  # plain tensors only
    m2 = module_format(m.format_name).from_spec(m.spec())
    m2(x)  # a forward before loading builds a kernel cache that loading must invalidate
    m2.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    assert torch.equal(m2(x), y)


def test_dynamic_int8_backends_match_the_dequantized_forward():
    lin = _linear()
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    for sym in (True, False):
        m = DynamicInt8Linear.from_linear(lin, rtn=True, sym=sym)
        ref = F.linear(x, m.dequantize(), m.bias)
        for backend in ("auto", "int_mm"):
            m.backend = backend
            assert _rel(m(x), ref) < 3e-2, (sym, backend, m.kernel)  # 8-bit activations


def test_dynamic_int8_needs_per_channel_8bit():
    with pytest.raises(ConfigError, match="8-bit codes with one group per output channel"):
        DynamicInt8Linear.from_linear(_linear(), recover_codes(fit_grid(torch.randn(64, 256), 8, True, 64)
                                                              .quantize(torch.randn(64, 256)) * 0, 8, 64))


@pytest.mark.parametrize("bits,group_size,groups", [(4, 0, 1), (8, 0, 1), (4, 9, 1), (8, 0, 2)])
def test_packed_conv_equals_conv_with_dequantized_kernel(bits, group_size, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=groups)  # 6/groups*9 columns: odd for groups=1 int4
    m = PackedConv2d.from_conv(conv, bits=bits, group_size=group_size, rtn=True)
    W = conv.weight.detach().reshape(8, -1)
    gs = group_size if group_size else W.shape[1]
    Wq = fit_grid(W, bits, True, 0 if gs == W.shape[1] else gs).quantize(W).reshape(conv.weight.shape)
    assert torch.equal(m.dequantize(), Wq)
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(m(x), F.conv2d(x, Wq, conv.bias, 2, 1, 1, groups))
    n = W.numel()
    code_bytes = 8 * -(-W.shape[1] // 2) if bits == 4 else n
    assert m.nbytes() == code_bytes + 2 * 8 * (W.shape[1] // gs) * 4 + 8 * 4
    assert "no integer conv kernel" in m.kernel
    m2 = PackedConv2d.from_spec(m.spec())
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
