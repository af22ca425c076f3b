"""Every real compressed module format (packed int8/int4, dynamic int8, packed conv, sparse storage,
low-rank, Tucker-2) saves and reloads to identical outputs, and exports to ONNX (dequantized)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.export import export_onnx, load, read_manifest, save
from brainsurgeon.export.qdq import qdq_equivalent
from brainsurgeon.formats import registered_module_formats

packed = pytest.importorskip("brainsurgeon.quant.packed")
dynamic = pytest.importorskip("brainsurgeon.quant.dynamic")
packed_conv = pytest.importorskip("brainsurgeon.quant.packed_conv")
sparse = pytest.importorskip("brainsurgeon.quant.sparse")
lowrank = pytest.importorskip("brainsurgeon.lowrank")

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
FCS = ("fc1", "fc2", "fc3", "fc4", "fc5", "fc6", "fc7")


class Mixed(nn.Module):
    """Three convs and eight Linears: one slot per compressed format."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        for n in FCS[1:]:
            setattr(self, n, nn.Linear(64, 64))
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1)
        for n in FCS:
            h = F.relu(getattr(self, n)(h))
        return self.out(h)


def _zero_smallest(lin: nn.Linear, frac: float, block: int = 1) -> nn.Linear:
    with torch.no_grad():
        W = lin.weight
        if block > 1:  # zero whole block x block tiles by their norm
            norms = W.reshape(W.shape[0] // block, block, -1, block).norm(dim=(1, 3))
            keep = norms > norms.flatten().kthvalue(int(norms.numel() * frac)).values
            W.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))
        else:
            W.masked_fill_(W.abs() <= W.abs().flatten().kthvalue(int(W.numel() * frac)).values, 0.0)
    return lin


def compressed() -> Mixed:
    torch.manual_seed(0)
    m = Mixed().eval()
    m.conv1 = packed_conv.PackedConv2d.from_conv(m.conv1, bits=8, rtn=True)
    m.conv2 = lowrank.Tucker2Conv2d(8, 16, 4, 6, kernel_size=(3, 3), padding=(1, 1))
    m.fc1 = packed.Int4WeightOnlyLinear.from_linear(m.fc1, group_size=32, rtn=True)
    m.fc2 = packed.Int8WeightOnlyLinear.from_linear(m.fc2, rtn=True)
    m.fc3 = dynamic.DynamicInt8Linear.from_linear(m.fc3, rtn=True)
    m.fc4 = sparse.SparseLinear.from_linear(_zero_smallest(m.fc4, 0.75), "csr")
    m.fc5 = sparse.SparseLinear.from_linear(_zero_smallest(m.fc5, 0.75), "bitmask")
    m.fc6 = sparse.SparseLinear.from_linear(_zero_smallest(m.fc6, 0.5, block=16), "bsr", block=16)
    m.fc7 = lowrank.LowRankLinear(64, 64, rank=8)
    return m.eval()


def test_every_format_round_trips_exactly(tmp_path):
    model = compressed()
    with torch.no_grad():
        ref = model(X)
    save(model, str(tmp_path / "ck"))
    formats = {n: e["format"] for n, e in read_manifest(str(tmp_path / "ck"))["modules"].items()}
    assert [formats[n] for n in ("conv1", "conv2", *FCS)] == [
        "packed_conv2d", "tucker2_conv2d", "int4_weight_only_linear", "int8_weight_only_linear",
        "dynamic_int8_linear", "sparse_linear", "sparse_linear", "sparse_linear", "lowrank_linear"]
    assert set(formats.values()) - {f for f in formats.values() if f.startswith("torch.")} <= set(
        registered_module_formats())
    again = load(str(tmp_path / "ck"), Mixed).eval()
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(again(X), ref)
    disk = (tmp_path / "ck" / "model.safetensors").stat().st_size
    dense = sum(p.numel() * 4 for p in Mixed().parameters())
    assert disk < 0.6 * dense  # really stored compressed, not as dense float32


def test_qdq_weights_equal_dequantize_bit_for_bit():
    model = compressed()
    for name in ("conv1", "fc1", "fc2", "fc3"):
        m = getattr(model, name)
        qdq = qdq_equivalent(m)
        assert qdq is not None and qdq.q.dtype == torch.int8
        assert torch.equal(qdq.weight(), m.dequantize().reshape(qdq.shape))
    assert qdq_equivalent(model.fc4) is None and qdq_equivalent(model.fc7) is None  # sparse, low-rank


@pytest.mark.parametrize("quantized", ["dequantize", "qdq"])
def test_formats_export_to_onnx(tmp_path, quantized):
    import onnx

    model = compressed()
    path = str(tmp_path / "m.onnx")
    res = export_onnx(model, (X,), path, quantized=quantized, optimize=False)  # the optimizer alone takes ~10 s
    assert res.max_abs_diff <= 1e-4
    packed_ = ["conv1", "fc1", "fc2", "fc3"]
    assert res.dequantized == (packed_ if quantized == "dequantize" else []) + ["fc4", "fc5", "fc6"]
    assert res.qdq == ([] if quantized == "dequantize" else packed_)  # low-rank fc7/conv2 stay factored
    with torch.no_grad():
        ref = model(X)
    assert res.diff_vs_compressed is not None and res.diff_vs_compressed < 0.05 * float(ref.abs().max())
    int8 = [i for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(int(torch.tensor(i.dims).prod()) for i in int8) == (0 if quantized == "dequantize" else
                                                                   8 * 9 + 64 * 1024 + 2 * 64 * 64)
