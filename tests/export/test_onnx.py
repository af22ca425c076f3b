"""ONNX export of pruned and quantized models matches torch within 1e-4 under onnxruntime."""

from __future__ import annotations

import os

import pytest
import torch
from export_fixtures import narrowed_digits, quantized_digits

from brainsurgeon.errors import FormatError
from brainsurgeon.export import export_onnx, onnx_export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def test_narrowed_model_matches_onnxruntime(tmp_path):
    model = narrowed_digits().train()  # export uses a copy in eval mode; the caller's model keeps train mode
    res = export_onnx(model, (X,), str(tmp_path / "m.onnx"))
    assert res.max_abs_diff <= 1e-4 and res.dequantized == [] and model.training
    got = onnx_export.run_onnxruntime(str(tmp_path / "m.onnx"), (X,))[0]
    with torch.no_grad():
        ref = model.eval()(X)
    assert float((torch.from_numpy(got) - ref).abs().max()) <= 1e-4
    import onnx

    conv2 = [i for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer if tuple(i.dims) == (12, 16, 3, 3)]
    assert len(conv2) == 1  # the narrowed conv is exported at its pruned shape


@pytest.mark.parametrize("quantized", ["dequantize", "as_is"])
def test_quantized_model_exports(tmp_path, quantized):
    model = quantized_digits()  # as_is: the test format's int8 storage + scale is exported as Cast/Mul
    res = export_onnx(model, X, str(tmp_path / "q.onnx"), quantized=quantized, optimize=False)
    assert res.max_abs_diff <= 1e-4
    assert res.dequantized == (["fc1", "fc2"] if quantized == "dequantize" else [])
    if quantized == "as_is":
        import onnx

        dtypes = {i.data_type for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
        assert onnx.TensorProto.INT8 in dtypes


def test_dynamic_batch(tmp_path):
    model = narrowed_digits()
    path = str(tmp_path / "m.onnx")
    export_onnx(model, (X,), path, dynamic_shapes=({0: "batch"},), optimize=False)
    x7 = torch.randn(7, 1, 8, 8)
    got = onnx_export.run_onnxruntime(path, (x7,))[0]
    with torch.no_grad():
        assert got.shape == (7, 10) and float((torch.from_numpy(got) - model(x7)).abs().max()) <= 1e-4


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(FormatError, match="quantized='int3'; allowed: 'dequantize', 'qdq', 'as_is'"):
        export_onnx(narrowed_digits(), (X,), str(tmp_path / "m.onnx"), quantized="int3")


def test_mismatch_leaves_no_file(tmp_path, monkeypatch):
    real = onnx_export.run_onnxruntime
    monkeypatch.setattr(onnx_export, "run_onnxruntime", lambda p, i: [o + 1e-3 for o in real(p, i)])
    with pytest.raises(FormatError, match=r"differs from torch by 0\.001.* > atol 0\.0001.*not written"):
        export_onnx(narrowed_digits(), (X,), str(tmp_path / "m.onnx"), optimize=False)
    assert os.listdir(tmp_path) == []
