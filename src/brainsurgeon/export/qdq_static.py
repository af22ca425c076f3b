"""Static int8 ONNX export in the QDQ form onnxruntime fuses end to end (QLinearConv, QLinearAdd, QGemm).

``export_onnx(..., quantized="qdq")`` writes each 8-bit ActQuant layer as QuantizeLinear/DequantizeLinear
on its input and a dequantized weight, in torch's decomposed form: the weight's scale and zero point
arrive through Cast nodes, the bias through Expand, BatchNorm stays after the Conv and no conv output
is quantized, so onnxruntime's QDQ selectors match nothing and every weight is dequantized on every run
(MobileNetV2 ran about 4x slower than fp32). This module writes the graph onnxruntime's QDQ transformer
expects (its "QDQ format"; onnxruntime docs, *Quantize ONNX models*):

1. BatchNorm is folded into the preceding Conv in torch. With int8 codes per output channel the fold is
   exact: W'_n = f_n W_n with f_n = gamma_n / sqrt(var_n + eps) keeps the codes (sign(f_n) k_n) and
   scales the channel's step by |f_n| (a channel with f_n < 0 holding the code -128, whose negation int8
   lacks, keeps its codes and takes the negative step f_n s_n; onnxruntime computes it as written).
2. The float model (folded) is exported, then every quantized Conv/Gemm gets: its input tensor as
   Q -> DQ with the calibrated (scale, zero) (uint8; shared by every consumer of that tensor), the
   weight as an INT8 initializer + per-channel DequantizeLinear (axis 0, zero 0), the bias as INT32
   with scale s_x s_w,n.
3. Each quantized layer's output (after a following Clip/Relu, which onnxruntime then folds into the
   Q) and both inputs and the output of every Add that touches a quantized tensor get a Q -> DQ too.
   Where a consumer's calibrated input scale already covers the tensor it is reused; the rest are
   calibrated min-max on ``calib`` by running the partly quantized graph (onnxruntime) -- the scales
   our fake-quant model does not have because it keeps those tensors float.

    >>> res = export_static_qdq(model, (x,), "out/int8.onnx", calib=[x[:8], x[8:16]])
    >>> res.qdq                          # the layers written with integer weights
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .._log import get_logger
from ..errors import FormatError

log = get_logger(__name__)

_ACT_OPS = ("Clip", "Relu")


def _fold_bn(conv_w: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, bias'): per-channel factor f = gamma / sqrt(var + eps) and the folded bias."""
    f = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias.detach()
    return f, (b - bn.running_mean) * f + bn.bias.detach()


def _scale_rows(codes: torch.Tensor, scale: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 (codes, scale) of f_n W_n, exactly: a channel with f_n < 0 negates its codes, or, when
    it holds the code -128 (whose negation int8 lacks), keeps them and takes a negative scale."""
    flip = (f < 0) & (codes.reshape(codes.shape[0], -1) > -128).all(dim=1)
    sign = torch.where(flip, -1.0, 1.0)
    new = (codes.float() * sign.view(-1, *[1] * (codes.dim() - 1))).to(torch.int8)
    return new, scale * f * sign


@torch.no_grad()
def plain_int8_copy(model: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A float copy of `model` with BatchNorm folded and plain layers whose weights are the int8 grids.

    Returns (copy, {weight initializer name: {"a_scale", "a_zero", "codes" int8, "w_scale" (out,)}})
    for every 8-bit static per-tensor ActQuant Conv2d/Linear (``qdq_module`` decides which).
    """
    from ..quant.act import act_quant_layers
    from ..quant.fakequant import rebuild_layer
    from ..quant.static import qdq_module

    work = copy.deepcopy(model).eval()
    specs: dict[str, dict[str, Any]] = {}
    for name, layer in act_quant_layers(work).items():
        q = qdq_module(layer, name)
        if q is None:
            continue
        specs[name] = {"a_scale": q.a_scale, "a_zero": q.a_zero, "codes": q.qweight.clone(),
                       "w_scale": q.w_scale.clone(), "bias": None if q.bias is None else q.bias.clone()}
    # BatchNorm right after a layer inside a Sequential (torchvision's Conv-BN-act blocks)
    for parent in work.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        kids = list(parent.named_children())
        for (n1, a), (n2, b) in zip(kids, kids[1:], strict=False):
            if not (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)):
                continue
            full = next(k for k, v in work.named_modules() if v is a)
            f, bias = _fold_bn(a.weight, a.bias, b)
            if full in specs:
                s = specs[full]
                s["codes"], s["w_scale"] = _scale_rows(s["codes"], s["w_scale"], f)
                s["bias"] = bias
            new = nn.Conv2d(a.in_channels, a.out_channels, a.kernel_size, a.stride, a.padding, a.dilation,
                            a.groups, bias=True).to(a.weight)
            new.weight.copy_(a.weight * f.view(-1, 1, 1, 1))
            new.bias.copy_(bias)
            setattr(parent, n1, new)
            setattr(parent, n2, nn.Identity())
    for name in specs:  # plain layers holding the grid values (the exported float weights are replaced anyway)
        layer = work.get_submodule(name)
        s = specs[name]
        W = s["codes"].float() * s["w_scale"].view(-1, *[1] * (s["codes"].dim() - 1))
        if type(layer) not in (nn.Conv2d, nn.Linear):
            layer = rebuild_layer(layer, nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d)
            work.set_submodule(name, layer)
        layer._forward_pre_hooks.clear()
        layer.weight.copy_(W)
        if s["bias"] is not None and layer.bias is None:
            layer.bias = nn.Parameter(s["bias"].clone())
    return work, {f"{n}.weight": s for n, s in specs.items()}


class _Graph:
    """The few graph edits of the QDQ rewrite, on an onnx ModelProto."""

    def __init__(self, model: Any) -> None:
        import onnx

        self.onnx, self.m, self.g = onnx, model, model.graph
        self.init = {i.name: i for i in self.g.initializer}
        self.quantized: dict[str, tuple[float, int]] = {}  # tensor -> its (scale, zero)
        self.dq_of: dict[str, str] = {}  # DQ output -> the tensor it quantizes
        self.n = 0

    def consumers(self, t: str) -> list[Any]:
        return [nd for nd in self.g.node if t in nd.input]

    def producer(self, t: str) -> Any:
        return next((nd for nd in self.g.node if t in nd.output), None)

    def _const(self, name: str, arr: np.ndarray) -> str:
        self.g.initializer.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def qdq_tensor(self, t: str, scale: float, zero: int, only: Any = None) -> None:
        """Q -> DQ on tensor t (uint8); every consumer (or only `only`) reads the DQ output."""
        helper = self.onnx.helper
        self.n += 1
        k = f"qdq{self.n}"
        s = self._const(f"{k}_scale", np.array(scale, dtype=np.float32))
        z = self._const(f"{k}_zero", np.array(zero, dtype=np.uint8))
        users = [only] if only is not None else self.consumers(t)
        for nd in users:
            for i, inp in enumerate(nd.input):
                if inp == t:
                    nd.input[i] = f"{k}_dq"
        graph_out = [o for o in self.g.output if o.name == t]
        nodes = [helper.make_node("QuantizeLinear", [t, s, z], [f"{k}_q"], name=f"{k}_Q"),
                 helper.make_node("DequantizeLinear", [f"{k}_q", s, z], [f"{k}_dq"], name=f"{k}_DQ")]
        prod = self.producer(t)
        at = 0 if prod is None else list(self.g.node).index(prod) + 1
        for j, nd in enumerate(nodes):
            self.g.node.insert(at + j, nd)
        self.dq_of[f"{k}_dq"] = t
        if only is None and not graph_out:
            self.quantized[t] = (scale, zero)

    def int_weight(self, node: Any, spec: dict[str, Any]) -> None:
        """The node's weight (input 1) and bias (input 2) as integer initializers + DequantizeLinear."""
        helper, nph = self.onnx.helper, self.onnx.numpy_helper
        w_name = node.input[1]
        W = nph.to_array(self.init[w_name])
        codes = spec["codes"].numpy().astype(np.int8)
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
            codes = codes.T  # (in, out): the channel axis is 1
        if codes.shape != W.shape:
            raise FormatError(f"QDQ export: weight {w_name} has shape {W.shape} in the ONNX graph but "
                              f"{codes.shape} in the model; export without BatchNorm folding or report the model")
        axis = 1 if codes.shape != spec["codes"].shape else 0
        ws = spec["w_scale"].numpy().astype(np.float32)
        self.g.initializer.remove(self.init.pop(w_name))
        self._const(f"{w_name}_q", codes)
        self._const(f"{w_name}_scale", ws)
        self._const(f"{w_name}_zero", np.zeros_like(codes, shape=ws.shape))
        at = list(self.g.node).index(node)
        self.g.node.insert(at, helper.make_node("DequantizeLinear", [f"{w_name}_q", f"{w_name}_scale",
                                                                    f"{w_name}_zero"], [w_name], axis=axis,
                                                name=f"{w_name}_DQ"))
        if len(node.input) > 2 and node.input[2] in self.init:
            b_name = node.input[2]
            b = nph.to_array(self.init[b_name]).astype(np.float64)
            bs_ = (spec["a_scale"] * ws).astype(np.float32)
            bq = np.clip(np.round(b / bs_), -(2**31), 2**31 - 1).astype(np.int32)
            self.g.initializer.remove(self.init.pop(b_name))
            self._const(f"{b_name}_q", bq)
            self._const(f"{b_name}_scale", bs_)
            self._const(f"{b_name}_zero", np.zeros_like(bq))
            self.g.node.insert(at, helper.make_node("DequantizeLinear", [f"{b_name}_q", f"{b_name}_scale",
                                                                        f"{b_name}_zero"], [b_name], axis=0,
                                                    name=f"{b_name}_DQ"))


def _act_output(g: _Graph, node: Any) -> str:
    """The node's output, or the output of the Clip/Relu that is its only consumer."""
    out = node.output[0]
    users = g.consumers(out)
    if len(users) == 1 and users[0].op_type in _ACT_OPS:
        return users[0].output[0]
    return out


def _uint8_params(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        return 1.0, 0
    s = (hi - lo) / 255.0
    return s, int(np.clip(round(-lo / s), 0, 255))


def _calibrate(model: Any, tensors: list[str], calib: Iterable[Any]) -> dict[str, tuple[float, int]]:
    """Min-max uint8 (scale, zero) of `tensors`, observed by running `model` on each calib batch."""
    import onnx
    import onnxruntime as ort

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # observe the graph as written
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    lo = dict.fromkeys(tensors, np.inf)
    hi = dict.fromkeys(tensors, -np.inf)
    seen = 0
    for batch in calib:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        outs = sess.run(tensors, {name: x.detach().cpu().numpy()})
        for t, v in zip(tensors, outs, strict=True):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
        seen += 1
    if not seen:
        raise FormatError("export_static_qdq: calib yielded no batch; pass the calibration batches used for "
                          "quantize_ (tensors or (tensor,) tuples)")
    return {t: _uint8_params(lo[t], hi[t]) for t in tensors}


def rewrite_qdq(model: Any, specs: dict[str, dict[str, Any]], calib: Iterable[Any] | None = None) -> list[str]:
    """Rewrite a float ONNX model (in place) into the QDQ form; returns the weights written as int8."""
    g = _Graph(model)
    targets = [nd for nd in list(g.g.node) if nd.op_type in ("Conv", "Gemm") and len(nd.input) > 1
               and nd.input[1] in specs and nd.input[1] in g.init]
    for nd in targets:  # input Q/DQ with the calibrated activation scales
        spec = specs[nd.input[1]]
        x = nd.input[0]
        pair = (spec["a_scale"], spec["a_zero"])
        if x not in g.dq_of:
            g.qdq_tensor(x, *pair)
        elif g.quantized.get(g.dq_of[x]) != pair:  # another consumer fixed this tensor's scale: its own Q/DQ
            nd.input[0] = g.dq_of[x]
            g.qdq_tensor(g.dq_of[x], *pair, only=nd)
    for nd in targets:
        g.int_weight(nd, specs[nd.input[1]])
    graph_outs = {o.name for o in g.g.output}
    need: list[str] = []
    for nd in targets:  # outputs (after Clip/Relu), so that each Conv is DQ -> Conv -> Q
        t = _act_output(g, nd)
        if t not in g.quantized and t not in graph_outs and t not in need:
            need.append(t)
    qsrc = set(g.dq_of)
    for nd in g.g.node:  # Adds that touch a quantized tensor: both inputs and the output
        if nd.op_type == "Add" and any(i in qsrc or i in need for i in nd.input):
            for t in (*nd.input, nd.output[0]):
                if t not in qsrc and t not in g.quantized and t not in graph_outs and t not in need \
                        and t not in g.init:
                    need.append(t)
    if need and calib is None:
        log.warning("export_static_qdq: no calib given; %d layer outputs stay float, so onnxruntime cannot fuse "
                    "those layers into int8 kernels", len(need))
    elif need:
        for t, (s, z) in _calibrate(model, need, calib).items():
            g.qdq_tensor(t, s, z)
    return [nd.input[1] for nd in targets]


def export_static_qdq(model: nn.Module, example_inputs: Any, path: str, calib: Iterable[Any] | None = None, *,
                      dynamic_shapes: Any = None, opset: int | None = None) -> Any:
    """Export `model` (8-bit static ActQuant layers) as a fully quantized QDQ ONNX file; see the module doc.

    calib: the calibration batches (tensors) for the scales our model lacks (layer outputs, Add inputs);
    without it those tensors stay float and onnxruntime fuses fewer layers. The file appears only
    once the export and the rewrite succeeded. Returns an
    :class:`~brainsurgeon.export.onnx_export.OnnxExport` whose ``max_abs_diff`` is onnxruntime vs the
    fake-quant model on the example inputs (the extra output quantization included; informational).
    """
    import onnx

    from .onnx_export import OnnxExport, _as_tuple, export_onnx, run_onnxruntime

    t0 = time.perf_counter()
    inputs = _as_tuple(example_inputs)
    plain, specs = plain_int8_copy(model)
    if not specs:
        raise FormatError(f"export_static_qdq: {type(model).__name__} has no 8-bit static per-tensor ActQuant "
                          f"Conv2d/Linear; quantize it first, e.g. compress(model, W8A8('RTN'), calib)")
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")
    try:
        export_onnx(plain, inputs, tmp, opset=opset, atol=float("inf"), dynamic_shapes=dynamic_shapes)
        m = onnx.load(tmp)
        done = rewrite_qdq(m, specs, calib)
        onnx.save(m, tmp)
        got = run_onnxruntime(tmp, inputs)[0]
        with torch.no_grad():
            ref = model.eval()(*inputs) if not model.training else copy.deepcopy(model).eval()(*inputs)
        diff = float((torch.from_numpy(got) - ref.detach().float().cpu()).abs().max())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    names = [w[: -len(".weight")] for w in done]
    log.info("static QDQ export of %s: %d int8 layers, max |ORT - fake-quant| %.3g", type(model).__name__,
             len(names), diff)
    return OnnxExport(path=path, max_abs_diff=diff, opset=opset, seconds=time.perf_counter() - t0, qdq=names)
