"""Real W8A8 kernels: the int8 GEMM equals fake-quant; QDQ export carries the calibrated scales into onnxruntime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import ConfigError
from brainsurgeon.quant.static import StaticInt8Linear, convert_static_int8_


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 24, generator=g) for _ in range(4)]


@pytest.mark.parametrize("act,weights", [
    (bs.ActQuant(bits=8), bs.GPTQ(bits=8, sym=True)),
    (bs.ActQuant(bits=8, sym=True, observer="mse"), bs.RTN(bits=8, sym=False)),
    (bs.ActQuant(bits=8, granularity="token", sym=True), bs.GPTQ(bits=8, sym=True)),
    (bs.ActQuant(bits=8, granularity="token"), bs.RTN(bits=8, sym=True)),
])
def test_int8_gemm_equals_fake_quant_within_one_rounding_step(act, weights):
    model, calib = _mlp(), _calib()
    bs.quantize_(model, act, calib)
    bs.quantize_(model, weights, calib)
    x = torch.cat(calib) * 1.3  # some inputs beyond the calibrated range: clipping must match too
    with torch.no_grad():
        ref = model(x)
        assert convert_static_int8_(model) == ["0", "2"]
        got = model(x)
    assert isinstance(model[0], StaticInt8Linear)
    # the integer sums are exact; only the float rescale differs from the fake-quant matmul, so the
    # outputs agree far inside one activation step times the largest weight row norm
    step = float(model[0].a_scale) if not act.dynamic else 0.0
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-3 * step


def test_static_int8_refuses_what_the_gemm_cannot_run():
    model = _mlp()
    bs.quantize_(model, bs.ActQuant(bits=8, granularity="channel"), _calib())
    with pytest.raises(ConfigError, match="SmoothQuant"):
        convert_static_int8_(model, rtn=True)
    assert type(model[0]).__name__ == "ActQuantLinear"  # nothing swapped
    with pytest.raises(ConfigError, match="ActQuant"):
        convert_static_int8_(_mlp())


def test_static_int8_save_load_round_trip(tmp_path):
    model = _mlp()
    bs.compress(model, bs.W8A8("RTN"), _calib())
    convert_static_int8_(model)
    bs.save(model, str(tmp_path / "ck"))
    again = bs.load(str(tmp_path / "ck"), _mlp)
    assert torch.equal(again[0].a_scale, model[0].a_scale) and torch.equal(again[0].qweight, model[0].qweight)
    x = torch.randn(5, 24)
    assert torch.equal(again(x), model(x))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_onnx_qdq_export_writes_the_calibrated_scales_and_runs_int8_convs(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    model = _convnet()
    calib = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    bs.compress(model, bs.W8A8("RTN"), calib)
    x = calib[0]
    path = str(tmp_path / "m.onnx")
    res = bs.export_onnx(model, (x,), path, quantized="qdq", atol=0.05)
    assert sorted(res.qdq) == ["0", "2", "6"]
    g = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(a.t) for n in g.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    vals = {**inits, **consts}
    for n in g.graph.node:  # constants cast to the scale dtype
        if n.op_type == "Cast" and n.input[0] in vals:
            vals[n.output[0]] = vals[n.input[0]]
    scales = [float(vals[n.input[1]]) for n in g.graph.node if n.op_type == "QuantizeLinear"]
    want = sorted(float(model.get_submodule(n).input_quantizer.scale) for n in ("0", "2", "6"))
    for w in want:  # every calibrated activation scale is in the graph
        assert min(abs(s - w) for s in scales) <= 1e-7 * w
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops  # onnxruntime runs the convolutions in int8
    assert any(i.data_type == onnx.TensorProto.INT8 and i.name == "0.qweight" for i in g.graph.initializer)
