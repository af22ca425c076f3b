"""The static int8 QDQ export: the graph onnxruntime fuses, exact BatchNorm folding, ORT vs fake-quant."""

import collections

import numpy as np
import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import FormatError
from brainsurgeon.export.qdq_static import export_static_qdq

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _bn(c, g):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics, one negative gamma (the fold flips that channel's codes)
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.weight[0] = -bn.weight[0]
        bn.bias.normal_(0, 0.1, generator=g)
        bn.running_mean.normal_(0, 0.1, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    return bn


def _quantized(model, x):
    model.eval()
    bs.compress(model, bs.W8A8("RTN"), [x[:8], x[8:]])
    return model


def _optimized_ops(path, tmp_path):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(o.optimized_model_filepath).graph.node)


def test_conv_bn_relu_conv_matches_fake_quant_within_one_step(tmp_path):
    torch.manual_seed(0)  # layer init: this seed puts the code -128 in the channel whose gamma is negative
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8, g), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(16, 3, 8, 8, generator=g)
    net = _quantized(net, x)
    path = str(tmp_path / "int8.onnx")
    res = export_static_qdq(net, (x,), path)  # every quantized tensor has a calibrated scale: no calib needed
    assert res.qdq == ["0", "3"]
    m = onnx.load(path)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 6
    inits = {i.name: i for i in m.graph.initializer}
    assert inits["0.weight_q"].data_type == onnx.TensorProto.INT8
    assert inits["0.bias_q"].data_type == onnx.TensorProto.INT32
    assert "0.weight" not in inits  # no float copy of a quantized weight
    # BatchNorm folded exactly: codes * scales == the fake-quant weight * gamma / sqrt(var + eps)
    codes = onnx.numpy_helper.to_array(inits["0.weight_q"]).astype(np.float32)
    scale = onnx.numpy_helper.to_array(inits["0.weight_scale"])
    bn = net[1]
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    assert np.abs(codes * scale[:, None, None, None] - net[0].weight.detach().numpy() * f[:, None, None, None]).max() \
        <= 1e-6
    assert (scale < 0).sum() == 1  # the -128 channel keeps its codes with a negative scale (int8 has no +128)
    # conv1 fused with its ReLU into one QLinearConv; conv2's output is the graph output (float: DQ -> Conv)
    opt = _optimized_ops(path, tmp_path)
    assert opt["QLinearConv"] == 1 and opt["Relu"] == 0
    # ORT's int8 conv1 rounds each code of conv2's input within one step of the fake-quant model's code,
    # so |ORT - torch| <= s2 * max_n sum_k |W2_nk| (+ float noise)
    with torch.no_grad():
        ref = net(x)
    got = torch.from_numpy(bs.export.onnx_export.run_onnxruntime(path, (x,))[0])
    s2 = float(net[3].input_quantizer.scale)
    bound = s2 * float(net[3].weight.detach().abs().sum(dim=(1, 2, 3)).max()) + 1e-4
    assert float((got - ref).abs().max()) <= bound
    assert res.max_abs_diff == pytest.approx(float((got - ref).abs().max()), abs=1e-6)
    # most codes agree exactly: the typical error is far below the worst-case bound
    assert float((got - ref).abs().mean()) <= 0.05 * bound


class _Residual(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8, g), nn.ReLU6())
        self.proj = nn.Sequential(nn.Conv2d(8, 8, 1), _bn(8, g))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.proj(h)
        return self.head(h.mean((2, 3)))


def test_residual_model_fuses_fully_with_calib(tmp_path):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=g)
    net = _quantized(_Residual(g), x)
    path = str(tmp_path / "res.onnx")
    export_static_qdq(net, (x[:2],), path, calib=[x[:8], x[8:]], dynamic_shapes=({0: "batch"},))
    opt = _optimized_ops(path, tmp_path)
    assert opt["QLinearConv"] == 2 and opt["QLinearAdd"] == 1 and opt["QGemm"] == 1
    assert opt["Conv"] == 0 and opt["Clip"] == 0 and opt["Gemm"] == 0
    got = bs.export.onnx_export.run_onnxruntime(path, (x,))[0]  # the dynamic batch axis works
    with torch.no_grad():
        ref = net(x).numpy()
    assert got.shape == (16, 5)
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) * 2 + self.b(x)


def test_one_tensor_two_scales_gets_a_quantizer_per_consumer(tmp_path):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, 6, 6, generator=g)
    net = _quantized(_TwoBranches(), x)
    with torch.no_grad():  # force different calibrated scales on the shared input
        net.b.input_quantizer.scale.mul_(2.0)
    path = str(tmp_path / "two.onnx")
    export_static_qdq(net, (x,), path)
    m = onnx.load(path)
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2 and all(n.input[0] == "x" for n in qs)
    scales = {float(onnx.numpy_helper.to_array(i)) for i in m.graph.initializer if i.name in {n.input[1] for n in qs}}
    want = sorted([float(net.a.input_quantizer.scale), float(net.b.input_quantizer.scale)])
    assert sorted(scales) == pytest.approx(want)
    with torch.no_grad():
        ref = net(x)
    got = torch.from_numpy(bs.export.onnx_export.run_onnxruntime(path, (x,))[0])
    assert float((got - ref).abs().max()) <= 1e-3  # no output quantization here: ORT = fake-quant up to float


def test_without_quantized_layers_is_refused(tmp_path):
    with pytest.raises(FormatError, match="no 8-bit static"):
        export_static_qdq(nn.Sequential(nn.Conv2d(3, 4, 1)), (torch.randn(1, 3, 4, 4),), str(tmp_path / "a.onnx"))
    assert not (tmp_path / "a.onnx").exists()
