"""Sparse storage: formats round-trip to the same dense weight, sparse matmul == dense, exact bytes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.errors import ConfigError, UnsupportedModuleError
from brainsurgeon.formats import module_format
from brainsurgeon.quant.sparse import (
    SparseLinear,
    break_even,
    pack_bits,
    semi_structured_,
    sparsify_storage_,
    unpack_bits,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small kernels on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _pruned(n_in=96, n_out=64, sparsity=0.8, block=1, seed=0, bias=True):
    """A Linear with `sparsity` of its weights (or of its block x block tiles) set to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    keep = torch.rand(n_out // block, n_in // block, generator=g) >= sparsity
    keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) * keep)
    return lin


def test_bitmask_round_trip_odd_columns():
    m = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    p = pack_bits(m)
    assert p.shape == (5, 2) and p.dtype == torch.uint8
    assert torch.equal(unpack_bits(p, 13), m)
    assert int(p[0, 0]) == sum(int(m[0, c]) << c for c in range(8))  # column c = bit c of byte 0


@pytest.mark.parametrize("fmt,block", [("bitmask", 1), ("csr", 1), ("bsr", 16), ("bsr", 8)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_formats_round_trip_and_match_the_dense_matmul(fmt, block, sparsity):
    lin = _pruned(sparsity=sparsity, block=block if fmt == "bsr" else 1)
    m = SparseLinear.from_linear(lin, fmt, block=block)
    assert torch.equal(m.dense_weight(), lin.weight.detach())
    for shape in [(96,), (1, 96), (32, 96), (4, 5, 96)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        y = m(x)
        assert y.shape == (*shape[:-1], 64)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    kept = int((lin.weight != 0).sum())
    assert m.density == pytest.approx(kept / lin.weight.numel())  # bsr: pruned in whole blocks


@pytest.mark.parametrize("bias", [True, False])
def test_bytes_are_exactly_the_format(bias):
    lin = _pruned(sparsity=0.75, block=16, bias=bias)
    nnz = int((lin.weight != 0).sum())
    b = 64 * 4 if bias else 0
    assert SparseLinear.from_linear(lin, "bitmask").nbytes() == 64 * 12 + 4 * nnz + b  # 96 bits = 12 bytes a row
    assert SparseLinear.from_linear(lin, "csr").nbytes() == 4 * 65 + 4 * nnz + 4 * nnz + b
    nblocks = nnz // 256
    assert SparseLinear.from_linear(lin, "bsr", block=16).nbytes() == 4 * 5 + 4 * nblocks + 4 * 256 * nblocks + b


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr"])
def test_spec_and_safetensors_round_trip(fmt, tmp_path):
    from safetensors.torch import load_file, save_file

    lin = _pruned(sparsity=0.7, block=8 if fmt == "bsr" else 1)
    m = SparseLinear.from_linear(lin, fmt, block=8)
    save_file(m.state_dict(), str(tmp_path / "s.safetensors"))
    m2 = module_format("sparse_linear").from_spec(m.spec())
    m2.load_state_dict(load_file(str(tmp_path / "s.safetensors")), strict=True)
    x = torch.randn(3, 96)
    assert torch.equal(m2(x), m(x)) and torch.equal(m2.dense_weight(), lin.weight.detach())


def test_bsr_block_must_divide_both_dims():
    with pytest.raises(ConfigError, match=r"block=7 must divide both in_features and out_features.*format='csr'"):
        SparseLinear.from_linear(_pruned(), "bsr", block=7)


def test_unknown_format_is_rejected():
    with pytest.raises(ConfigError, match=r"format='coo'; allowed"):
        SparseLinear(8, 8, "coo", 0)


def test_sparsify_storage_swaps_only_sparse_enough_layers():
    model = nn.Sequential(_pruned(sparsity=0.9, seed=1), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(4, 96)
    with torch.no_grad():
        y = model(x)
    swapped = sparsify_storage_(model, "csr", min_sparsity=0.8)
    assert list(swapped) == ["0"] and isinstance(model[0], SparseLinear) and type(model[2]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_break_even_interpolates_the_first_crossing():
    assert break_even([0.5, 0.7, 0.9], 1.0, [3.0, 2.0, 0.5]) == pytest.approx(0.8333, abs=1e-4)
    assert break_even([0.5, 0.9], 1.0, [0.9, 0.5]) == 0.5  # sparse always wins
    assert break_even([0.5, 0.9], 1.0, [2.0, 1.5]) is None  # never wins
    assert break_even([0.5, 0.7, 0.9], 1.0, [0.9, 1.2, 0.6]) == pytest.approx(0.7 + 0.2 * 0.2 / 0.6, abs=1e-4)  # noise
    with pytest.raises(ConfigError, match="3 sparsities but 2 timings"):
        break_even([0.5, 0.7, 0.9], 1.0, [1.0, 2.0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_semi_structured_is_refused_on_cpu_with_the_alternative():
    with pytest.raises(UnsupportedModuleError, match=r"needs a CUDA fp16/bf16 weight.*SparseLinear\('csr'\)"):
        semi_structured_(nn.Linear(64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_matches_dense_on_cuda():
    lin = nn.Linear(128, 128).half().cuda()
    with torch.no_grad():
        w = lin.weight.reshape(128, -1, 4)
        w[..., 2:] = 0  # 2:4
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    y = lin(x)
    semi_structured_(lin)
    torch.testing.assert_close(lin(x), y, rtol=1e-2, atol=1e-2)
