"""Real int8 kernels for layers with quantized inputs (W8A8).

:class:`StaticInt8Linear`: int8 weights (per output channel) and int8 activations with the scale
calibrated by an :class:`~brainsurgeon.quant.act.ActQuantizer` (static, per tensor) or computed
per token (dynamic); one ``torch._int_mm`` (int8 x int8 -> int32 accumulation) and a fused
rescale. With x = s_x (x8 - z_x), w_n = s_n (w8_n - z_n) (x8, w8 int8 codes, zero points shifted
by -128) and K input features::

    y_mn = s_x s_n (acc_mn - z_x sum_k w8_nk - z_n sum_k x8_mk + K z_x z_n) + b_n,   acc = x8 @ w8^T

For symmetric weights (z_n = 0) and a static scale this is ``y = alpha * acc + beta`` with the
per-channel vectors alpha = s_x s and beta = b - alpha z_x sum_k w8 precomputed once.

Convolutions take the ONNX route: :func:`qdq_module` gives a module whose forward is the
QuantizeLinear/DequantizeLinear pattern (``torch.fake_quantize_per_*``) with the calibrated
activation scale and int8 per-channel weights, which ``export_onnx(..., quantized="qdq")``
writes and onnxruntime fuses into QLinearConv / QLinearMatMul.

    >>> bs.quantize_(model, bs.ActQuant(bits=8), calib); bs.quantize_(model, bs.GPTQ(bits=8), calib)
    >>> convert_static_int8_(model)            # ActQuantLinear -> StaticInt8Linear
    ['fc1', 'fc2']
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._log import get_logger
from ..errors import ConfigError
from ..formats import register_module_format
from .act import ActQuantLinear, act_quant_layers
from .grid import _minmax_params, fit_grid
from .packed import CachedKernel, weight_codes

log = get_logger(__name__)


@register_module_format("static_int8_linear")
class StaticInt8Linear(CachedKernel):
    """W8A8 Linear: int8 codes ``qweight`` (N, K) = codes - 128 with ``w_scale``/``w_zero`` (N, 1), input
    scale/zero ``a_scale``/``a_zero`` (codes zero, 0..255) or per-token dynamic scales, float32 bias.

    >>> m = StaticInt8Linear.from_act_linear(model.fc1)        # an ActQuantLinear, 8-bit input
    >>> m.kernel
    'torch._int_mm (int8 x int8 -> int32), static per-tensor activation scale'
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dynamic: bool = False,
                 sym_act: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dynamic, self.sym_act = in_features, out_features, dynamic, sym_act
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features, 1))
        self.register_buffer("w_zero", torch.full((out_features, 1), 128.0))
        self.register_buffer("a_scale", torch.ones(1))
        self.register_buffer("a_zero", torch.full((1,), 128.0))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def spec(self) -> dict[str, Any]:
        """JSON-safe constructor arguments (see :mod:`brainsurgeon.formats`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dynamic": self.dynamic, "sym_act": self.sym_act}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> StaticInt8Linear:
        return cls(**spec)

    @classmethod
    @torch.no_grad()
    def from_act_linear(cls, layer: nn.Module, *, rtn: bool = False, name: str = "") -> StaticInt8Linear:
        """Pack an 8-bit-input :class:`ActQuantLinear` whose weight is on an 8-bit per-row grid (or round it: rtn)."""
        q = getattr(layer, "input_quantizer", None)
        if not isinstance(layer, ActQuantLinear) or q is None:
            raise ConfigError(f"layer {name!r}: StaticInt8Linear needs an ActQuantLinear (a Linear with an input "
                              f"quantizer), got {type(layer).__name__}; run quantize_(model, ActQuant(bits=8)) first")
        if q.cfg.bits != 8 or q.cfg.granularity == "channel":
            raise ConfigError(f"layer {name!r}: the int8 GEMM needs 8-bit activations per tensor or per token, got "
                              f"{q.cfg.describe()}; per-channel scales cannot leave the sum (fold them into the "
                              f"weights with SmoothQuant, quant.smooth) or use granularity='tensor'")
        codes = weight_codes(layer, 8, 0, rtn, True, name, mse=False)
        k = codes.q - codes.zero.to(torch.int32)  # (N, K) signed levels
        if int(k.min()) >= -128 and int(k.max()) <= 127:  # re-centre on zero 128: no weight-zero term in the GEMM
            codes = type(codes)(k + 128, codes.scale, torch.full_like(codes.zero, 128.0), 8, codes.group_size)
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, q.cfg.dynamic, q.cfg.sym)
        m.to(layer.weight.device)
        m.qweight.copy_((codes.q - 128).to(torch.int8))
        m.w_scale.copy_(codes.scale)
        m.w_zero.copy_(codes.zero)
        if not q.cfg.dynamic:
            m.a_scale.copy_(q.scale.reshape(1))
            m.a_zero.copy_(q.zero.reshape(1))
        if layer.bias is not None:
            m.bias.copy_(layer.bias.detach())
        return m

    @property
    def kernel(self) -> str:
        mode = "dynamic per-token" if self.dynamic else "static per-tensor"
        return f"torch._int_mm (int8 x int8 -> int32), {mode} activation scale"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel!r}"

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``w_scale * (q - w_zero)`` (ONNX export, checks)."""
        return self.w_scale * (self.qweight.float() + 128 - self.w_zero)

    def _consts(self) -> dict[str, torch.Tensor]:
        if not self._cache:
            c = self._cache
            c["wt"] = self.qweight.t().contiguous()  # (K, N)
            c["wsum"] = self.qweight.float().sum(1)  # (N,)
            c["zw"] = (self.w_zero[:, 0] - 128)  # (N,)
            c["sym_w"] = torch.tensor(bool((c["zw"] == 0).all()))
            if not self.dynamic:
                za = self.a_zero - 128
                alpha = self.a_scale * self.w_scale[:, 0]  # (N,)
                beta = -alpha * (za * c["wsum"] - self.in_features * za * c["zw"])
                c["alpha"], c["beta"] = alpha, beta + (self.bias if self.bias is not None else 0.0)
        return self._cache

    def _quantize_x(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int8 codes - 128 (M, K) and the scale, zero (shifted) used (fake_quantize's rounding)."""
        if self.dynamic:
            lo = torch.clamp(x.amin(dim=1, keepdim=True), max=0)
            hi = torch.clamp(x.amax(dim=1, keepdim=True), min=0)
            s, z = _minmax_params(lo, hi, 255, self.sym_act)  # (M, 1) each
        else:
            s, z = self.a_scale, self.a_zero
            if x.device.type == "cpu":  # one fused pass: round(x / s) + z - 128, clamped to int8
                with warnings.catch_warnings():  # quantized tensors are deprecated in torch; the kernel is not
                    warnings.simplefilter("ignore", UserWarning)
                    q = torch.quantize_per_tensor(x, float(s), int(z) - 128, torch.qint8)
                return q.int_repr(), s, z - 128
        x8 = (x / s).round_().add_(z - 128).clamp_(-128, 127).to(torch.int8)
        return x8, s, z - 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        c = self._consts()
        x8, s, za = self._quantize_x(x2)
        y = torch._int_mm(x8, c["wt"]).to(torch.float32)  # (M, N), exact int32 sums
        if not self.dynamic:
            y.mul_(c["alpha"]).add_(c["beta"])
            if not bool(c["sym_w"]):
                y -= c["alpha"] * c["zw"] * x8.float().sum(1, keepdim=True)
        else:
            alpha = s * self.w_scale[:, 0]  # (M, N)
            corr = za * c["wsum"] + c["zw"] * (x8.float().sum(1, keepdim=True) - self.in_features * za)
            y = alpha * (y - corr)
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)


def convert_static_int8_(model: nn.Module, *, rtn: bool = False, ignore: Iterable[str] = ()) -> list[str]:
    """Replace every 8-bit-input ActQuantLinear by a :class:`StaticInt8Linear` (in place); returns the names.

    The weights must already lie on an 8-bit per-row grid (``quantize_(model, GPTQ(bits=8))``) unless
    ``rtn=True``. Every replacement is built before the first swap: on an error nothing changes.
    ActQuant convolutions stay (their int8 path is ONNX QDQ in onnxruntime: :func:`qdq_module`).

    >>> convert_static_int8_(model, rtn=True)
    """
    ign = [re.compile(p) for p in ignore]
    todo = {n: m for n, m in act_quant_layers(model).items()
            if isinstance(m, ActQuantLinear) and not any(p.fullmatch(n) for p in ign)}
    if not todo:
        raise ConfigError(f"convert_static_int8_: {type(model).__name__} has no Linear with an input quantizer; "
                          f"run quantize_(model, ActQuant(bits=8), calib) first")
    new = {n: StaticInt8Linear.from_act_linear(m, rtn=rtn, name=n).train(m.training) for n, m in todo.items()}
    for n, m in new.items():
        model.set_submodule(n, m)
    return list(new)


class QDQLayer(nn.Module):
    """A Linear/Conv2d in the QuantizeLinear/DequantizeLinear form ONNX runtimes fuse into int8 kernels.

    Input: per-tensor uint8 quantize + dequantize with the calibrated (scale, zero); weight: int8 codes
    ``qweight`` per output channel (zero point 0) + dequantize, so the ONNX file stores 1 byte per weight.
    Forward equals the ActQuant layer's fake-quant forward up to float rounding.
    """

    def __init__(self, layer: nn.Module, a_scale: float, a_zero: int, qweight: torch.Tensor,
                 w_scale: torch.Tensor) -> None:
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

        self.conv = None if isinstance(layer, nn.Linear) else {
            "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        self.a_scale, self.a_zero = float(a_scale), int(a_zero)
        self.register_buffer("qweight", qweight.to(torch.int8))  # layer.weight's shape
        self.register_buffer("w_scale", w_scale.float().reshape(-1))
        self.register_buffer("w_zero", torch.zeros(w_scale.numel(), dtype=torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        xq = qd.quantize_per_tensor(x, self.a_scale, self.a_zero, 0, 255, torch.uint8)
        xd = qd.dequantize_per_tensor(xq, self.a_scale, self.a_zero, 0, 255, torch.uint8)
        W = qd.dequantize_per_channel(self.qweight, self.w_scale, self.w_zero, 0, -128, 127, torch.int8)
        if self.conv is None:
            return F.linear(xd, W, self.bias)
        return F.conv2d(xd, W, self.bias, **self.conv)


@torch.no_grad()
def qdq_module(layer: nn.Module, name: str = "") -> QDQLayer | None:
    """The QDQ form of an 8-bit per-tensor static ActQuant Linear/Conv2d, or None if it has none.

    Weights are read as int8 symmetric per-channel codes when they lie on such a grid, else rounded
    to one (the exported weights then differ from the layer's by at most half a step; logged).
    """
    q = getattr(layer, "input_quantizer", None)
    if q is None or q.cfg.bits != 8 or q.cfg.granularity != "tensor" or not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return None
    from .qat import infer_grid

    W = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()  # (out, cols)
    grid = infer_grid(W, 8, sym=True)
    if grid is None:
        log.info("%s: weights are not on an int8 per-channel grid; the QDQ export rounds them to one", name)
        grid = fit_grid(W, 8, sym=True, mse=False)
    codes = (grid.quantize(W) / grid.scale).round()  # (out, cols) in [-128, 127]
    return QDQLayer(layer, float(q.scale.reshape(-1)[0]), int(q.zero.reshape(-1)[0]),
                    codes.reshape(layer.weight.shape), grid.scale[:, 0])
