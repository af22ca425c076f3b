"""Activation quantization: observers, the input quantizer, and layers whose inputs are fake-quantized.

A static quantizer maps an input x to ``s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)`` with a
scale s and zero point z fixed on calibration data, per tensor or per input channel; a dynamic one
(``token``) computes s, z per row at run time. Observers (what fixes s, z from calibration data):

* ``minmax``: lo = min x, hi = max x over all batches (0 always inside the range);
* ``ema``: lo, hi averaged over batches, lo <- d lo + (1 - d) min x (Jacob et al. 2018);
* ``percentile``: per batch the p-th / (100 - p)-th percentile, averaged over batches;
* ``mse``: the shrink factor of the min-max range (1, 0.99, ..., 0.21) that minimises
  ||x - q(x)||_2^2 on the calibration activations (the search of ``grid.fit_rows`` with p = 2).

The quantizer runs as a forward *pre-hook* of its layer (registered when the layer is built), so
every hook registered later -- the calibration driver's Hessian capture -- sees the quantized
input: OBS/GPTQ then solve on H = 2 X_q X_q^T / n (OBC's joint setting, Frantar & Alistarh 2022)::

    >>> insert_act_quant_(model, {"fc1": ActQuant(bits=8)}, calib)      # observe, then fix scales
    >>> model.fc1.input_quantizer.scale, model.fc1.input_quantizer.zero
    >>> bs.quantize_(model, bs.GPTQ(bits=4), calib)                     # H from the quantized inputs
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..config import ActQuant
from ..errors import CalibrationError, UnsupportedModuleError
from ..formats import register_module_format
from .fakequant import _layer_args, fake_quantize, lsq_grad_scale, rebuild_layer
from .grid import _minmax_params, fit_rows

log = get_logger(__name__)

_MSE_SAMPLES = 4096  # columns (positions) kept per batch for the mse observer


def as_rows(x: torch.Tensor, granularity: str, channel_dim: int) -> torch.Tensor:
    """x as (rows, n): one row per scale. tensor: (1, numel); channel: (C, numel / C); token: (tokens, C)."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.transpose(0, channel_dim).reshape(x.shape[channel_dim], -1)  # (C, n)
    return x.reshape(-1, x.shape[-1])  # (tokens, C)


class Observer:
    """Running statistics of the rows of calibration activations -> (scale, zero) per row.

    >>> obs = Observer(ActQuant(bits=8)); obs.update(torch.tensor([[-1.0, 3.0]]))
    >>> obs.params()          # asym 8-bit: scale 4/255, zero round(1 / (4/255)) = 64
    """

    def __init__(self, cfg: ActQuant) -> None:
        self.cfg = cfg
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def update(self, X: torch.Tensor) -> None:
        """Add one batch of activations as rows (rows, n)."""
        X = X.detach().float()
        kind = self.cfg.observer
        if kind == "percentile":
            q = self.cfg.percentile / 100.0
            Xs = X if X.shape[1] <= 1 << 22 else X[:, torch.randperm(X.shape[1], generator=self._gen)[: 1 << 22]]
            lo, hi = torch.quantile(Xs, 1.0 - q, dim=1), torch.quantile(Xs, q, dim=1)
        else:
            lo, hi = X.amin(dim=1), X.amax(dim=1)
        if kind == "mse":
            n = X.shape[1]
            cols = torch.randperm(n, generator=self._gen)[:_MSE_SAMPLES] if n > _MSE_SAMPLES else slice(None)
            self.samples.append(X[:, cols].cpu())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif kind == "minmax" or kind == "mse":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        elif kind == "ema":
            d = self.cfg.ema_decay
            self.lo, self.hi = d * self.lo + (1 - d) * lo, d * self.hi + (1 - d) * hi
        else:  # percentile: the mean over batches
            k = self.batches
            self.lo, self.hi = (self.lo * k + lo) / (k + 1), (self.hi * k + hi) / (k + 1)
        self.batches += 1

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), one per row; grid.quantize convention (codes 0..2^b - 1, sym zero 2^(b-1))."""
        if self.lo is None:
            raise CalibrationError("activation observer saw no data")
        maxq = 2**self.cfg.bits - 1
        if self.cfg.observer == "mse":
            X = torch.cat(self.samples, dim=1)  # (rows, kept positions)
            return fit_rows(X, self.cfg.bits, self.cfg.sym, mse=True, norm=2.0)
        lo, hi = torch.clamp(self.lo, max=0), torch.clamp(self.hi, min=0)
        return _minmax_params(lo, hi, maxq, self.cfg.sym)


class ActQuantizer(nn.Module):
    """Fake-quantizes a layer input; static scales in buffers ``scale``/``zero`` (or dynamic per token).

    ``observe()`` switches to calibration (inputs pass unchanged and feed the observer),
    ``freeze()`` fixes the scales. ``learn_scale_()`` makes ``scale`` a Parameter trained with
    LSQ's gradient (Esser et al., ICLR 2020) through :func:`~brainsurgeon.quant.fakequant.fake_quantize`.
    """

    def __init__(self, cfg: ActQuant, channels: int = 1, channel_dim: int = -1) -> None:
        super().__init__()
        self.cfg, self.channel_dim = cfg, channel_dim
        n = channels if cfg.granularity == "channel" else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero", torch.zeros(n))
        self.observer: Observer | None = None

    @property
    def maxq(self) -> int:
        return 2**self.cfg.bits - 1

    def spec(self) -> dict[str, Any]:
        return {"act": self.cfg.to_dict(), "channels": int(self.scale.numel()), "channel_dim": self.channel_dim}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ActQuantizer:
        from ..config import config_from_dict

        return cls(config_from_dict(spec["act"]), spec["channels"], spec["channel_dim"])  # type: ignore[arg-type]

    def observe(self) -> None:
        self.observer = Observer(self.cfg)

    def freeze(self) -> None:
        """Fix scale/zero from the observer (no-op for dynamic quantizers)."""
        if self.observer is None:
            return
        s, z = self.observer.params()
        with torch.no_grad():
            self.scale.copy_(s.to(self.scale))
            self.zero.copy_(z.to(self.zero))
        self.observer = None

    def learn_scale_(self) -> None:
        """Make the static scale trainable (LSQ); zero stays a buffer."""
        if not isinstance(self.scale, nn.Parameter) and not self.cfg.dynamic:
            s = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(s)

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.granularity != "channel":
            return t
        view = [1] * x.dim()
        view[self.channel_dim] = -1
        return t.view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # a Linear's (B, T, C) input: its padding tokens' rows left out
            from ..calib.padding import real_rows

            seen = real_rows(x) if self.channel_dim == -1 else x
            self.observer.update(as_rows(seen, self.cfg.granularity, self.channel_dim))
            return x
        if self.cfg.dynamic:  # per token: scale/zero of each row now
            lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0).detach()
            hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0).detach()
            s, z = _minmax_params(lo, hi, self.maxq, self.cfg.sym)
            return fake_quantize(x, s.to(x.dtype), z.to(x.dtype), self.maxq)
        s, z = self._shape(self.scale, x).to(x.dtype), self._shape(self.zero, x).to(x.dtype)
        g = lsq_grad_scale(x.numel() // max(self.scale.numel(), 1), self.maxq) if self.scale.requires_grad else 1.0
        return fake_quantize(x, s, z, self.maxq, g)

    def extra_repr(self) -> str:
        return self.cfg.describe()


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The forward pre-hook of every ActQuant layer (module level, so deepcopy keeps it)."""
    return (module.input_quantizer(args[0]), *args[1:])


class _ActQuantMixin:
    """A Linear/Conv subclass (same parameters, same names) whose input passes ``input_quantizer``."""

    input_quantizer: ActQuantizer

    def _attach(self, quantizer: ActQuantizer) -> None:
        self.input_quantizer = quantizer
        self.register_forward_pre_hook(_quantize_input)  # type: ignore[attr-defined]

    def spec(self) -> dict[str, Any]:
        """JSON-safe constructor arguments (see :mod:`brainsurgeon.formats`)."""
        args, kw = _layer_args(self)  # type: ignore[arg-type]
        if isinstance(self, nn.Linear):
            layer: dict[str, Any] = {"in_features": args[0], "out_features": args[1]}
        else:
            layer = {"in_channels": args[0], "out_channels": args[1], "kernel_size": list(args[2]),
                     **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}}
        layer["bias"] = self.bias is not None  # type: ignore[attr-defined]
        return {"layer": layer, "quantizer": self.input_quantizer.spec()}

    def qdq_module(self) -> nn.Module | None:
        """The QuantizeLinear/DequantizeLinear form for ONNX (8-bit per-tensor static only; else None)."""
        from .static import qdq_module

        return qdq_module(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        """An empty layer with its quantizer, every tensor at its saved shape."""
        new = cls(**spec["layer"])  # type: ignore[call-arg]
        new._attach(ActQuantizer.from_spec(spec["quantizer"]))
        return new


@register_module_format("act_quant_linear")
class ActQuantLinear(_ActQuantMixin, nn.Linear):
    """``nn.Linear`` with a quantized input."""


@register_module_format("act_quant_conv1d")
class ActQuantConv1d(_ActQuantMixin, nn.Conv1d):
    """``nn.Conv1d`` with a quantized input."""


@register_module_format("act_quant_conv2d")
class ActQuantConv2d(_ActQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with a quantized input."""


ACT_QUANT_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: ActQuantLinear, nn.Conv1d: ActQuantConv1d, nn.Conv2d: ActQuantConv2d,
}


def with_act_quant(module: nn.Module, cfg: ActQuant, name: str = "") -> nn.Module:
    """An ActQuant twin of `module` (Linear/Conv1d/Conv2d) sharing its weight and bias Parameters.

    An ActQuant layer gets a fresh quantizer with `cfg` (re-calibration).
    """
    base = next((b for b in ACT_QUANT_TYPES if type(module) in (b, ACT_QUANT_TYPES[b])), None)
    if base is None:
        raise UnsupportedModuleError(
            f"layer {name!r} of type {type(module).__name__}: activation quantization supports "
            f"{[t.__name__ for t in ACT_QUANT_TYPES]}; pass ignore=['{name}'] to skip it")
    conv = base is not nn.Linear
    if cfg.granularity == "token" and conv:
        raise UnsupportedModuleError(f"layer {name!r}: per-token activation scales are for Linear layers; use "
                                     f"granularity='tensor' or 'channel' for convolutions, or ignore=['{name}']")
    channels = module.in_channels if conv else module.in_features  # type: ignore[union-attr]
    new = rebuild_layer(module, ACT_QUANT_TYPES[base])
    q = ActQuantizer(cfg, int(channels), 1 if conv else -1).to(module.weight.device)
    new._attach(q)  # type: ignore[operator]
    return new


def act_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} of every layer with an input quantizer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _ActQuantMixin)}


@torch.no_grad()
def calibrate_act_quant_(model: nn.Module, names: Iterable[str], calib: Any, max_batches: int = 0) -> int:
    """Observe the inputs of the named ActQuant layers on `calib` and fix their scales; returns batches seen.

    Observation runs with every quantizer passing its input unchanged (float activations), over the data
    as given less its padding tokens (``calib.data.eval_forwards`` records each batch's ``attention_mask``;
    a padding token's activations are no input the model is used on, and would widen the ranges).
    """
    from ..calib.data import eval_forwards

    qs = {n: model.get_submodule(n).input_quantizer for n in names}
    static = {n: q for n, q in qs.items() if not q.cfg.dynamic}
    if not static:
        return 0
    try:
        for q in static.values():
            q.observe()
        seen = eval_forwards(model, calib, max_batches)
        missing = [n for n, q in static.items() if q.observer is None or q.observer.batches == 0]
        if missing:
            raise CalibrationError(f"activation quantizers of {missing} saw no input from the calibration data; "
                                   f"check that calib feeds these layers, or pass ignore={missing}")
        for q in static.values():
            q.freeze()
    finally:
        for q in static.values():
            q.observer = None
    return seen


def insert_act_quant_(model: nn.Module, plan: dict[str, ActQuant], calib: Any, max_batches: int = 0) -> list[str]:
    """Give every layer of `plan` an input quantizer (in place), then calibrate the static scales.

    On failure every layer is put back. Returns the names quantized.

    >>> insert_act_quant_(model, {"fc1": ActQuant(bits=8, observer="mse")}, loader)
    ['fc1']
    """
    old = {n: model.get_submodule(n) for n in plan}
    new = {n: with_act_quant(m, plan[n], n) for n, m in old.items()}  # validate every layer first
    try:
        for n, m in new.items():
            model.set_submodule(n, m)
        calibrate_act_quant_(model, list(plan), calib, max_batches)
    except BaseException:
        for n, m in old.items():
            model.set_submodule(n, m)
        raise
    log.info("activation quantization on %d layers", len(new))
    return list(new)


def remove_act_quant_(model: nn.Module, ignore: Iterable[str] = ()) -> list[str]:
    """Put plain layers (same Parameters) back in place of the ActQuant layers; returns their names."""
    ign = [re.compile(p) for p in ignore]
    done = []
    for n, m in act_quant_layers(model).items():
        if any(p.fullmatch(n) for p in ign):
            continue
        base = next(b for b in ACT_QUANT_TYPES if isinstance(m, b))
        model.set_submodule(n, rebuild_layer(m, base))
        done.append(n)
    return done


def learn_act_scales_(model: nn.Module) -> list[str]:
    """Make every static activation scale a trainable Parameter (LSQ); returns the layer names.

    Call before building the optimizer (e.g. before ``distill``); the scales train with the weights.

    >>> learn_act_scales_(model); bs.distill(model, teacher, data, bs.KD(epochs=1))
    """
    names = []
    for n, m in act_quant_layers(model).items():
        if not m.input_quantizer.cfg.dynamic:
            m.input_quantizer.learn_scale_()
            names.append(n)
    return names
