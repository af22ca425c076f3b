"""Fake quantization for quantization-aware training (QAT): the grid in the forward pass,
a straight-through estimator (STE) in the backward pass, and optionally learnable scales.

Forward, per weight (or activation) x with scale s, zero point z and 2^b levels::

    x_q = s * (clamp(round(x / s) + z, 0, maxq) - z)          # == brainsurgeon.quant.grid.quantize

Backward (Bengio et al. 2013, STE; Esser et al., "Learned Step Size Quantization", ICLR 2020)::

    d x_q / d x = 1  if -z <= x / s <= maxq - z  else 0          # pass inside the clip range
    d x_q / d s = round(x/s) - x/s  inside,  (clamp(...) - z)  outside   # LSQ, times grad_scale

    >>> W = torch.randn(8, 16, requires_grad=True)
    >>> g = fit_grid(W.detach(), bits=4)
    >>> s, z = g.columns(16)
    >>> Wq = fake_quantize(W, s, z, g.maxq)       # on the grid; gradients flow by the STE
    >>> Wq.sum().backward()

The modules :class:`FakeQuantLinear`, :class:`FakeQuantConv1d`, :class:`FakeQuantConv2d` are
subclasses of the torch layers they replace (same parameters, same names), whose forward uses
the fake-quantized weight and, when ``act_bits`` is set, a fake-quantized input (per tensor).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _FakeQuantSTE(torch.autograd.Function):
    """x_q = s (clamp(round(x/s) + z, 0, maxq) - z); STE for x, LSQ gradient for s."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
        q = torch.clamp(torch.round(x / s) + z, 0, maxq)  # same ops as grid.quantize: bit-identical
        ctx.save_for_backward(x, s, z)
        ctx.maxq = maxq
        return s * (q - z)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, z = ctx.saved_tensors
        v = x / s  # position in units of the step
        inside = (v >= -z) & (v <= ctx.maxq - z)
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            clipped = torch.clamp(torch.round(v) + z, 0, ctx.maxq) - z  # level index minus zero
            ds = torch.where(inside, torch.round(v) - v, clipped)
            gs = (g * ds).sum_to_size(s.shape)
        return gx, gs, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize `x` on the grid (scale, zero, maxq), broadcasting; differentiable by STE.

    `grad_scale` multiplies the gradient reaching `scale` (LSQ uses 1 / sqrt(numel * Q_p)).

    >>> fake_quantize(torch.tensor([0.26, 9.0]), torch.tensor(0.5), torch.tensor(8.0), 15)
    tensor([0.5000, 3.5000])
    """
    if grad_scale != 1.0 and scale.requires_grad:
        scale = scale * grad_scale + (scale - scale * grad_scale).detach()  # value s, gradient * g
    return _FakeQuantSTE.apply(x, scale, zero, maxq)


def lsq_grad_scale(numel: int, maxq: int) -> float:
    """LSQ's step-size gradient scale g = 1 / sqrt(N * Q_p) (Esser et al. 2020, Sec. 2.2)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(maxq, 1))


def expand_groups(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """(rows, groups) -> (rows, cols): one entry per weight column (differentiable)."""
    if group_size == 0:
        return t.expand(-1, cols)
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


class _FakeQuantMixin:
    """Weight/activation fake-quant state shared by the layer subclasses below.

    Buffers/parameters: ``w_scale``, ``w_zero`` (rows x groups); ``a_scale``, ``a_zero`` (1 each)
    when ``act_bits`` > 0. Scales are Parameters when ``learn_scale`` is set.
    """

    weight: nn.Parameter
    w_scale: torch.Tensor
    w_zero: torch.Tensor
    a_scale: torch.Tensor
    a_zero: torch.Tensor

    def _init_fake_quant(self, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                         act_bits: int, learn_scale: bool) -> None:
        rows = self.weight.shape[0]
        if scale.shape[0] != rows or scale.shape != zero.shape:
            raise ValueError(f"{type(self).__name__}: scale/zero must be ({rows}, groups), got "
                             f"{tuple(scale.shape)} and {tuple(zero.shape)}")
        dev, dt = self.weight.device, self.weight.dtype
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        self.maxq, self.act_maxq = 2**bits - 1, (2**act_bits - 1 if act_bits else 0)
        self.learn_scale = learn_scale
        s = scale.detach().to(device=dev, dtype=dt).clone()
        self.register_buffer("w_zero", zero.detach().to(device=dev, dtype=dt).clone())  # type: ignore[attr-defined]
        if learn_scale:
            self.w_scale = nn.Parameter(s)
        else:
            self.register_buffer("w_scale", s)  # type: ignore[attr-defined]
        if act_bits:
            a = torch.ones(1, device=dev, dtype=dt)
            if learn_scale:
                self.a_scale = nn.Parameter(a)
            else:
                self.register_buffer("a_scale", a)  # type: ignore[attr-defined]
            self.register_buffer("a_zero", torch.zeros(1, device=dev, dtype=dt))  # type: ignore[attr-defined]

    def weight_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero expanded to the (rows, cols) weight matrix."""
        cols = self.weight[0].numel()
        return (expand_groups(self.w_scale, self.group_size, cols),
                expand_groups(self.w_zero, self.group_size, cols))

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, in the layer's weight shape (on the grid)."""
        W = self.weight.reshape(self.weight.shape[0], -1)  # (out, in/g * prod(k))
        s, z = self.weight_columns()
        g = lsq_grad_scale(W[0].numel(), int((self.maxq - self.w_zero).max())) if self.learn_scale else 1.0
        return fake_quantize(W, s, z, self.maxq, g).reshape(self.weight.shape)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tensor fake quantization of the layer input (identity when act_bits = 0)."""
        if not self.act_bits:
            return x
        g = lsq_grad_scale(x[0].numel(), self.act_maxq) if self.learn_scale else 1.0
        return fake_quantize(x, self.a_scale.to(x.dtype), self.a_zero.to(x.dtype), self.act_maxq, g)

    def set_act_range(self, lo: float, hi: float) -> None:
        """Fit the per-tensor activation grid to the observed range [lo, hi] (0 is always on it)."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = max((hi - lo) / self.act_maxq, 1e-8)
        with torch.no_grad():
            self.a_scale.fill_(s)
            self.a_zero.fill_(float(round(-lo / s)))

    def extra_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits else ""
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{super().extra_repr()}, bits={self.bits}{g}{act}"  # type: ignore[misc]


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (and input, if act_bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class FakeQuantConv1d(_FakeQuantMixin, nn.Conv1d):
    """``nn.Conv1d`` whose forward uses the fake-quantized weight (and input, if act_bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class FakeQuantConv2d(_FakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses the fake-quantized weight (and input, if act_bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


FAKE_QUANT_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d,
}


def _layer_args(module: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Constructor arguments that rebuild `module`'s layer type with the same hyper-parameters."""
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features), {}
    m: Any = module
    return ((m.in_channels, m.out_channels, m.kernel_size),
            {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
             "padding_mode": m.padding_mode})


def rebuild_layer(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` layer with `module`'s hyper-parameters that shares its weight and bias Parameters."""
    args, kw = _layer_args(module)
    new = cls(*args, **kw, bias=module.bias is not None, device="meta")
    new.weight = module.weight
    if module.bias is not None:
        new.bias = module.bias
    return new.train(module.training)


def to_fake_quant(module: nn.Module, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                  act_bits: int = 0, learn_scale: bool = False) -> nn.Module:
    """A fake-quant copy of `module` (Linear/Conv1d/Conv2d) sharing its weight and bias Parameters.

    scale, zero: (out_features, groups) as in :class:`brainsurgeon.quant.grid.Grid`.

    >>> g = fit_grid(lin.weight.detach(), bits=4)
    >>> fq = to_fake_quant(lin, g.scale, g.zero, bits=4, group_size=0)
    """
    cls = FAKE_QUANT_TYPES.get(type(module))
    if cls is None:
        raise TypeError(f"no fake-quant module for {type(module).__name__}; "
                        f"supported: {[t.__name__ for t in FAKE_QUANT_TYPES]}")
    new = rebuild_layer(module, cls)
    new._init_fake_quant(scale, zero, bits, group_size, act_bits, learn_scale)  # type: ignore[attr-defined]
    return new
