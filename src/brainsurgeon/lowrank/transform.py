"""The verb ``transform_``: replace k x k convs by compact designs fitted to their outputs.

    >>> rep = transform_(model, Separable(kind="depthwise", ratio=0.5), calib=loader)   # data-aware
    >>> rep = transform_(model, Separable(kind="spatial", ratio=0.25, data_aware=False))  # weight-space
    >>> print(rep.to_table())

Every Conv2d with groups=1 and a kernel larger than 1x1 (both sides > 1 for ``spatial``) is replaced in
place by a :class:`SpatialSeparableConv2d`, :class:`DepthwiseSeparableConv2d` or (``bottleneck``)
:class:`Tucker2Conv2d` with the same input/output channels, so the BatchNorm and activation after it
stay where they are. With calibration data, each layer's input Hessian comes from the layer-by-layer
driver (sequential by default: a layer is fitted on the outputs of the already transformed layers
before it), and the rows report the relative output error ``tr(dW H dW^T) / tr(W H W^T)`` (for
``data_aware=False`` too, then measured, not minimised); without calib, the kernel error. On any
failure every replaced module is put back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..calib.data import iter_batches, prepare_calibration
from ..config import CalibOptions, Config, match_configs
from ..errors import ConfigError, UnsupportedModuleError
from ..report import CompressionReport, LayerRow
from .api import _row, replace_layers_
from .compact import COMPACT, DepthwiseSeparableConv2d, SpatialSeparableConv2d
from .config import Separable
from .modules import FACTORIZED, Tucker2Conv2d
from .separable import dense_kernel, design_params, design_rank, fit_separable, output_loss

log = get_logger(__name__)


def _why_not(mod: nn.Conv2d, kind: str) -> str:
    """'' when `mod` can take the design `kind`, else the reason it stays dense."""
    kh, kw = mod.kernel_size
    if mod.groups != 1:
        return f"grouped/depthwise conv (groups={mod.groups})"
    if kh * kw == 1:
        return "1x1 kernel (use LowRank / factorize_ for 1x1 convs)"
    if isinstance(mod.padding, str):
        return f"padding={mod.padding!r} (give explicit padding)"
    if kind == "spatial" and (kh == 1 or kw == 1):
        return f"kernel {kh}x{kw} is already one-dimensional"
    if kind == "spatial" and mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r}: a (k x 1, 1 x k) pair equals the conv only with zero padding"
    return ""


def plan_transform(model: nn.Module, cfg: Separable, ignore: Iterable[str] = (),
                   overrides: Any = ()) -> tuple[dict[str, Separable], list[str]]:
    """Layer name -> Separable config (first full-match override wins), and notes on convs kept dense.

    >>> plan, notes = plan_transform(model, Separable(kind="spatial", ratio=0.5), ignore=("conv1",))
    """
    if not isinstance(cfg, Separable):
        raise ConfigError(f"transform_ needs a Separable config, e.g. Separable(kind='depthwise', ratio=0.5); "
                          f"got {cfg!r}")
    over = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    for pat, c in over:
        if not isinstance(c, Separable):
            raise ConfigError(f"override {pat!r}: transform_ overrides must be Separable configs, got {c!r}")
    inside: set[int] = set()
    convs, notes = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (*FACTORIZED, *COMPACT)):
            inside.update(id(m) for m in mod.modules() if m is not mod)
        elif name and id(mod) not in inside and isinstance(mod, nn.Conv2d):
            convs[name] = mod
    plan: dict[str, Separable] = match_configs(list(convs), cfg, ignore, over,  # type: ignore[assignment]
                                               known=[n for n, _ in model.named_modules() if n])
    for name in list(plan):
        why = _why_not(convs[name], plan[name].kind)
        if why:
            notes.append(f"{name}: {why}; kept dense")
            del plan[name]
        elif not torch.is_floating_point(convs[name].weight) or convs[name].weight.device.type == "meta":
            raise UnsupportedModuleError(f"layer {name}: weight {convs[name].weight.dtype} on "
                                         f"{convs[name].weight.device} cannot be transformed; pass "
                                         f"ignore=['{name}'] or load/dequantize the weights first")
    if not plan:
        raise ConfigError(f"no k x k Conv2d (groups=1) is left to transform in {type(model).__name__} after "
                          f"ignore={list(ignore)} ({'; '.join(notes) or 'no conv layers'}); loosen ignore")
    return plan, notes


def following_batchnorm(model: nn.Module, names: list[str], calib: Any) -> dict[str, torch.Tensor]:
    """``gamma / sqrt(var + eps)`` (T,) of the eval-mode BatchNorm2d that directly consumes each named conv's
    output, found by tensor identity on one calibration forward (convs feeding anything else are absent).

    >>> following_batchnorm(model, ["conv1"], loader)["conv1"].shape
    torch.Size([16])
    """
    outs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors stay alive, so no id is reused
    found: dict[str, torch.Tensor] = {}
    hooks = []

    def conv_hook(name: str) -> Any:
        return lambda m, args, out: outs.__setitem__(id(out), (name, out))

    def bn_hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        name = outs[id(args[0])][0] if id(args[0]) in outs else None
        if name is not None and name not in found and m.running_var is not None:
            w = m.weight.detach() if m.weight is not None else torch.ones_like(m.running_var)
            found[name] = w / (m.running_var + m.eps).sqrt()

    modules = dict(model.named_modules())
    try:
        for n in names:
            hooks.append(modules[n].register_forward_hook(conv_hook(n)))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                hooks.append(m.register_forward_pre_hook(bn_hook))
        args, kwargs = next(iter(iter_batches(calib, max_batches=1)))
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return found


def transform_module(name: str, conv: nn.Conv2d, cfg: Separable, H: torch.Tensor | None = None,
                     row_scale: torch.Tensor | None = None) -> tuple[nn.Module | None, LayerRow]:
    """The compact replacement of one conv (None when it would not be smaller) and its report row.

    H: the layer's input Hessian (cols, cols); the fit is data-aware when ``cfg.data_aware``, and the
    row's loss is the output error on H whenever H is given. row_scale (T,): per-output-channel weights
    of the error (the scale of the BatchNorm after the conv; see :func:`fit_separable`).

    >>> new, row = transform_module("conv2", model.conv2, Separable(kind="depthwise", ratio=0.5), H)
    """
    t0 = time.perf_counter()
    W4 = conv.weight.detach()
    shape = tuple(W4.shape)
    rank = design_rank(cfg.kind, shape, cfg.ratio)
    fit = fit_separable(W4, H if cfg.data_aware else None, cfg.kind, rank, cfg.sweeps, cfg.cg_iters, cfg.damp,
                        cfg.tucker_sweeps, row_scale)
    Wm = W4.to(torch.float64).reshape(shape[0], -1)
    if row_scale is not None:
        Wm = Wm * row_scale.to(Wm).abs()[:, None]  # the loss the fit minimised: BN-scaled outputs
    W_hat = dense_kernel(cfg.kind, fit.factors, shape).reshape(shape[0], -1)
    if row_scale is not None:
        W_hat = W_hat * row_scale.to(Wm).abs()[:, None]
    loss = output_loss(Wm, W_hat, H)
    total = output_loss(Wm, torch.zeros_like(Wm), H)
    before, after = W4.numel(), design_params(cfg.kind, shape, rank)
    fs = [f.to(W4.dtype).to(W4.device) for f in fit.factors]
    new: nn.Module | None
    if cfg.kind == "spatial":
        new, label = SpatialSeparableConv2d.from_factors(conv, *fs), f"spatial r{rank}"
    elif cfg.kind == "depthwise":
        new, label = DepthwiseSeparableConv2d.from_factors(conv, *fs), f"depthwise x{rank}"
    else:
        new, label = Tucker2Conv2d.from_factors(conv, *fs), f"bottleneck {rank}"
    label += " data-aware" if cfg.data_aware and H is not None else " weight-space"
    if cfg.skip_larger and after >= before:
        new, after, loss, label = None, before, 0.0, label + " kept dense"
    if new is not None:
        new.train(conv.training)
        for p in new.parameters():
            p.requires_grad_(conv.weight.requires_grad)
    return new, _row(name, label, shape, before, after, loss, total, time.perf_counter() - t0, 0,
                     float(torch.finfo(W4.dtype).bits))


def transform_(model: nn.Module, cfg: Config, calib: Any = None, *, ignore: Iterable[str] = (),
               overrides: Any = (), options: CalibOptions | None = None) -> CompressionReport:
    """Replace every k x k Conv2d (groups=1) of `model` in place by a compact design (see :class:`Separable`).

    calib is required when a config has ``data_aware=True``; with calib every row reports the relative
    output error on the calibration inputs. options: the calibration driver's mode (default sequential).

    >>> rep = transform_(model, Separable(kind="bottleneck", ratio=0.5), calib=loader)
    >>> print(rep.to_table())
    """
    plan, notes = plan_transform(model, cfg, ignore, overrides)  # type: ignore[arg-type]
    aware = [n for n, c in plan.items() if c.data_aware]
    if aware and calib is None:
        raise ConfigError(f"Separable(data_aware=True) fits layer outputs and needs calibration data for "
                          f"{aware[:3]}; pass calib=loader, or use Separable(..., data_aware=False)")
    modules = dict(model.named_modules())
    report = CompressionReport(notes=list(notes))
    scales: dict[str, torch.Tensor] = {}
    if options is not None and not isinstance(options, CalibOptions):
        raise ConfigError(f"transform_: options must be a CalibOptions (e.g. CalibOptions(mode='dense')), "
                          f"got {options!r}")
    if calib is not None:  # checked against the model before any layer is replaced; one-shot data is kept
        calib, calib_notes = prepare_calibration(model, calib, "transform_",
                                                 max_batches=(options or CalibOptions()).max_batches)
        report.notes += calib_notes
        scales = {n: s for n, s in following_batchnorm(model, list(plan), calib).items() if plan[n].bn_aware}
        if scales:
            report.notes.append(f"errors weighted by the following BatchNorm's gamma/sigma for {len(scales)} convs")

    def build(name: str, module: nn.Module, H: torch.Tensor | None) -> tuple[nn.Module | None, LayerRow]:
        return transform_module(name, module, plan[name], H, scales.get(name))  # type: ignore[arg-type]

    replaced = replace_layers_(model, list(plan), list(plan) if calib is not None else [], calib, options, build,
                               report)
    before = sum(modules[n].weight.numel() for n in plan)
    after = sum(r.params for r in report.rows)
    report.notes.append(f"transformed {replaced} of {len(plan)} convs ({cfg.describe()}): {before} -> "
                        f"{after} weights ({after / max(before, 1):.1%})")
    return report


@dataclass(frozen=True)
class SeparableEntry:
    """One search-database variant of a k x k conv: a design at a weight ratio, its output error and costs."""

    kind: str
    ratio: float
    rank: Any  # int (spatial R / depthwise m) or (r_out, r_in) (bottleneck)
    loss: float  # tr(dW H dW^T) on the calibration Hessian (||dW||^2 without one)
    rel_loss: float
    params: int  # weights + bias of the replacement module
    macs: int  # counted by torch.utils.flop_counter on the real module for one input of `input_hw`


def separable_entries(conv: nn.Conv2d, H: torch.Tensor | None = None, input_hw: tuple[int, int] = (32, 32),
                      ratios: Iterable[float] = (0.5, 0.25), kinds: Iterable[str] = ("spatial", "depthwise",
                                                                                    "bottleneck"),
                      data_aware: bool = True) -> list[SeparableEntry]:
    """Per-layer variants of `conv` under every compact design and weight ratio, with measured MACs.

    >>> [(e.kind, e.params) for e in separable_entries(nn.Conv2d(16, 32, 3, padding=1), ratios=[0.5])][:1]
    [('spatial', 2352)]
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, conv.in_channels, *input_hw, dtype=conv.weight.dtype, device=conv.weight.device)
    out = []
    for kind in kinds:
        for ratio in ratios:
            cfg = Separable(kind=kind, ratio=ratio, data_aware=data_aware and H is not None, skip_larger=False)
            why = _why_not(conv, kind)
            if why:
                raise UnsupportedModuleError(f"separable_entries: {kind} does not apply: {why}")
            new, row = transform_module("", conv, cfg, H)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                new.eval()(x)  # type: ignore[union-attr]
            out.append(SeparableEntry(kind, ratio, design_rank(kind, tuple(conv.weight.shape), ratio), row.loss,
                                      row.rel_loss, sum(p.numel() for p in new.parameters()),  # type: ignore[union-attr]
                                      fc.get_total_flops() // 2))
    return out
