"""The verb ``factorize_`` and search-database entries for low-rank layers.

    >>> rep = factorize_(model, LowRank(param_ratio=0.5), calib=None)            # plain SVD / Tucker-2
    >>> rep = factorize_(bert, LowRank(param_ratio=0.5, activation_aware=True), calib=loader,
    ...                  ignore=(r"pooler\\..*",))
    >>> rank_entries(model.fc1, H, ranks=[8, 16, 32])   # [RankEntry(rank=8, loss=.., rel_loss=.., params=..), ..]

Linear layers become :class:`LowRankLinear`; Conv2d layers (groups=1) with a k x k kernel become
:class:`Tucker2Conv2d` (``conv="tucker2"``) or :class:`LowRankConv2d` (``conv="svd"``, and always
for 1x1 kernels, where Tucker-2 would only add a core). The model is changed in place; on any
failure every replaced module is put back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..calib import run_layerwise, weight_matrix
from ..config import CalibOptions, Config, match_configs
from ..errors import ConfigError, UnsupportedModuleError
from ..report import CompressionReport, LayerRow
from .config import LowRank
from .modules import FACTORIZED, LowRankConv2d, LowRankLinear, Tucker2Conv2d
from .svd import choose_rank, decompose, linear_params, truncate
from .tucker import choose_tucker_ranks, reconstruct, tucker2, tucker2_params

log = get_logger(__name__)


@dataclass(frozen=True)
class RankEntry:
    """One search-database variant of a layer: its rank, layer loss and weight count."""

    rank: int
    loss: float  # tr(dW H dW^T) with the calibration Hessian, or ||dW||_F^2 without one
    rel_loss: float  # loss / tr(W H W^T) (or / ||W||_F^2): the search solvers' score
    params: int


def _kind(module: nn.Module, cfg: LowRank) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if cfg.conv == "svd" or module.kernel_size == (1, 1):
        return "conv_svd"
    return "tucker2"


def _eligible(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Layers factorize_ can replace, and notes on the ones it cannot."""
    inside: set[int] = set()
    out, notes = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (*FACTORIZED, nn.MultiheadAttention)):
            inside.update(id(m) for m in mod.modules() if m is not mod)  # F.multi_head_attention reads
            continue  # out_proj.weight directly; factorized modules are done
        if not name or id(mod) in inside:
            continue
        if isinstance(mod, nn.Linear):
            out[name] = mod
        elif isinstance(mod, nn.Conv2d):
            if mod.groups == 1:
                out[name] = mod
            else:
                notes.append(f"{name}: grouped/depthwise conv (groups={mod.groups}) kept dense")
    return out, notes


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def plan_factorization(model: nn.Module, cfg: LowRank, ignore: Iterable[str] = (),
                       overrides: Any = ()) -> tuple[dict[str, LowRank], list[str]]:
    """Layer name -> LowRank config (first full-match override wins), and notes on skipped layers.

    >>> plan, notes = plan_factorization(model, LowRank(rank=8), ignore=("fc2",))
    """
    if not isinstance(cfg, LowRank):
        raise ConfigError(f"factorize_ needs a LowRank config, e.g. LowRank(param_ratio=0.5); got {cfg!r}")
    over = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    for pat, c in over:
        if not isinstance(c, LowRank):
            raise ConfigError(f"override {pat!r}: factorize_ overrides must be LowRank configs, got {c!r}")
    layers, notes = _eligible(model)
    plan: dict[str, LowRank] = match_configs(layers, cfg, ignore, over,  # type: ignore[assignment]
                                             known=[n for n, _ in model.named_modules() if n])
    for name in list(plan):
        hooks = {k: len(getattr(layers[name], k, {})) for k in _HOOK_DICTS}
        if any(hooks.values()):
            plan.pop(name)
            notes.append(f"{name}: kept dense because it carries {sum(hooks.values())} hook(s) of yours "
                         f"({', '.join(k.strip('_') for k, v in hooks.items() if v)}); factorizing replaces the "
                         f"module and would drop them. Remove the hooks first, or pass ignore=['{name}']")
            log.info(notes[-1])
    if not plan:
        raise ConfigError(f"no Linear or Conv2d (groups=1) layer is left to factorize in {type(model).__name__} "
                          f"after ignore={list(ignore)}; loosen ignore" + (f" ({'; '.join(notes)})" if notes else ""))
    for name in plan:
        W = layers[name].weight
        if not torch.is_floating_point(W) or W.device.type == "meta":
            raise UnsupportedModuleError(f"layer {name}: weight {W.dtype} on {W.device} cannot be factorized; "
                                         f"pass ignore=['{name}'] or load/dequantize the weights first")
    return plan, notes


def _row(name: str, label: str, shape: tuple[int, ...], before: int, after: int, loss: float,
         total: float, seconds: float, retries: int = 0, bits: float = 32.0) -> LayerRow:
    def k(n: int) -> str:
        return f"{n / 1000:.0f}k" if n >= 10000 else str(n)

    return LayerRow(name=name, method=f"{label} {k(before)}->{k(after)}", shape=shape, params=after,
                    nonzeros=after, bits=bits, loss=float(loss), rel_loss=float(loss / max(total, 1e-300)),
                    seconds=seconds, damp_retries=retries)


def factorize_module(name: str, module: nn.Module, cfg: LowRank,
                     H: torch.Tensor | None = None) -> tuple[nn.Module | None, LayerRow]:
    """The factorized replacement of one layer (None when it would not be smaller) and its report row.

    >>> new, row = factorize_module("fc1", model.fc1, LowRank(rank=16))
    """
    t0 = time.perf_counter()
    kind = _kind(module, cfg)
    W = module.weight.detach()
    before = W.numel()
    if kind == "tucker2":
        T, S = W.shape[:2]
        r_out, r_in = choose_tucker_ranks(W, cfg)
        after = tucker2_params(T, S, W[0, 0].numel(), r_out, r_in)
        U, G, V = tucker2(W, r_out, r_in, cfg.tucker_sweeps)
        loss = float(((reconstruct(U, G, V) - W.to(torch.float64)) ** 2).sum())
        total = float((W.to(torch.float64) ** 2).sum())
        label = f"Tucker2 ({r_out},{r_in})/({T},{S})"
        new: nn.Module | None = Tucker2Conv2d.from_factors(module, U.to(W.dtype), G.to(W.dtype), V.to(W.dtype))
        retries = 0
    else:
        Wm = weight_matrix(module)  # (out, in*kh*kw)
        spec = decompose(Wm, H if cfg.activation_aware else None, cfg.damp, name)
        r = choose_rank(spec.s, *Wm.shape, cfg)
        after = linear_params(*Wm.shape, r)
        losses = spec.losses(H)
        loss, total = float(losses[r]), float(losses[0])
        label = f"{'ASVD' if cfg.activation_aware else 'SVD'} r{r}/{spec.full_rank}"
        A, B = truncate(spec, r, W.dtype)
        A, B = A.to(W.device), B.to(W.device)
        bias = module.bias.detach() if module.bias is not None else None
        new = LowRankLinear.from_factors(A, B, bias) if kind == "linear" else LowRankConv2d.from_factors(module, A, B)
        retries = spec.damp_retries
    if cfg.skip_larger and after >= before:
        new, after, loss = None, before, 0.0
        label += " kept dense"
    if new is not None:
        new.train(module.training)
        for p in new.parameters():
            p.requires_grad_(module.weight.requires_grad)
    return new, _row(name, label, tuple(W.shape), before, after, loss, total, time.perf_counter() - t0, retries,
                     float(torch.finfo(W.dtype).bits))


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted `name`; returns the module it replaced."""
    old = model.get_submodule(name)
    model.set_submodule(name, new)
    return old


Build = Callable[[str, nn.Module, torch.Tensor | None], tuple[nn.Module | None, LayerRow]]


def replace_layers_(model: nn.Module, names: list[str], layerwise: list[str], calib: Any,
                    options: CalibOptions | None, build: Build, report: CompressionReport) -> int:
    """Replace layers in place: ``build(name, module, H) -> (new module or None, row)`` for each of `names`,
    the `layerwise` ones with their Hessian from :func:`run_layerwise` on `calib` (in that order, first),
    the others with ``H=None``; each row goes to `report`. On any failure every replaced module is put
    back. Returns the number of layers replaced.

    >>> n = replace_layers_(model, ["fc1"], [], None, None, lambda n, m, H: (None, row), report)
    """
    modules = dict(model.named_modules())
    swapped: list[tuple[str, nn.Module]] = []

    def apply(name: str, module: nn.Module, H: torch.Tensor | None) -> None:
        new, row = build(name, module, H)
        report.add_row(row)
        if new is not None:
            swapped.append((name, _swap(model, name, new)))
        log.info("%s: %s rel.err %.3e", name, row.method, row.rel_loss)

    try:
        if layerwise:
            report.notes.extend(run_layerwise(model, layerwise, calib, apply, options or CalibOptions()))
        for name in names:
            if name not in layerwise:
                apply(name, modules[name], None)
    except BaseException:
        for name, old in reversed(swapped):
            _swap(model, name, old)
        raise
    return len(swapped)


def factorize_(model: nn.Module, cfg: Config, calib: Any = None, *, ignore: Iterable[str] = (),
               overrides: Any = (), options: CalibOptions | None = None) -> CompressionReport:
    """Replace every Linear / Conv2d (groups=1) of `model` in place by its low-rank factorization.

    calib is required when a config has ``activation_aware=True`` (the Hessians come from
    :func:`brainsurgeon.calib.run_layerwise` with `options`, default sequential). Rows report the rank,
    params before -> after (in the method label; ``params`` is after) and the relative error
    ``tr(dW H dW^T) / tr(W H W^T)`` (H = I without calibration: ``||dW||^2 / ||W||^2``).

    >>> rep = factorize_(model, LowRank(param_ratio=0.5, activation_aware=True), calib=loader)
    >>> print(rep.to_table())
    """
    plan, notes = plan_factorization(model, cfg, ignore, overrides)  # type: ignore[arg-type]
    modules = dict(model.named_modules())
    aware = [n for n, c in plan.items() if c.activation_aware and _kind(modules[n], c) != "tucker2"]
    if aware and calib is None:
        raise ConfigError(f"LowRank(activation_aware=True) needs calibration data for {aware[:3]}...; "
                          f"pass calib=loader, or use activation_aware=False")
    if options is not None and not isinstance(options, CalibOptions):
        raise ConfigError(f"factorize_: options must be a CalibOptions (e.g. CalibOptions(mode='dense')), "
                          f"got {options!r}")
    if aware:  # checked against the model before any layer is replaced
        from ..calib import prepare_calibration

        calib, calib_notes = prepare_calibration(model, calib, "factorize_",
                                                 max_batches=(options or CalibOptions()).max_batches)
        notes = list(notes) + calib_notes
    report = CompressionReport(notes=list(notes))

    def build(name: str, module: nn.Module, H: torch.Tensor | None) -> tuple[nn.Module | None, LayerRow]:
        if H is not None and H.dim() != 2:
            raise UnsupportedModuleError(f"layer {name}: grouped Hessian {tuple(H.shape)}; only groups=1")
        return factorize_module(name, module, plan[name], H)

    replaced = replace_layers_(model, list(plan), aware, calib, options, build, report)
    before = sum(modules[n].weight.numel() for n in plan)
    after = sum(r.params for r in report.rows)
    report.notes.append(f"factorized {replaced} of {len(plan)} layers: {before} -> {after} weights "
                        f"({after / max(before, 1):.1%})")
    return report


def rank_entries(module: nn.Module, H: torch.Tensor | None = None, ranks: Iterable[int] | None = None,
                 activation_aware: bool | None = None, damp: float = 0.01) -> list[RankEntry]:
    """Search-database entries (rank -> layer loss, weights) of a Linear or Conv2d from ONE decomposition.

    The loss is ``tr(dW H dW^T)`` with the calibration Hessian H (cols, cols) when given, else
    ``||dW||_F^2``; activation_aware (default: H is given) picks which SVD truncates. ranks:
    default every rank from 1 to min(rows, cols).

    >>> [e.rank for e in rank_entries(nn.Linear(8, 4), ranks=[1, 2])]
    [1, 2]
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "groups", 1) != 1:
        raise UnsupportedModuleError(f"rank_entries: {type(module).__name__} is not a Linear or a Conv2d "
                                     f"with groups=1")
    aware = H is not None if activation_aware is None else activation_aware
    if aware and H is None:
        raise ConfigError("rank_entries: activation_aware=True needs the layer's Hessian H")
    W = weight_matrix(module)
    spec = decompose(W, H if aware else None, damp)
    losses = spec.losses(H)
    ranks = list(range(1, spec.full_rank + 1)) if ranks is None else list(ranks)
    bad = [r for r in ranks if not 1 <= r <= spec.full_rank]
    if bad:
        raise ConfigError(f"rank_entries: ranks {bad} are outside [1, {spec.full_rank}]")
    total = max(float(losses[0]), 1e-300)
    return [RankEntry(r, float(losses[r]), float(losses[r]) / total, linear_params(*W.shape, r)) for r in ranks]


@dataclass(frozen=True)
class TuckerEntry:
    """One search-database variant of a k x k conv: its Tucker-2 ranks, kernel error and weight count."""

    ranks: tuple[int, int]  # (r_out, r_in)
    loss: float  # ||K - K_hat||_F^2
    rel_loss: float  # loss / ||K||_F^2
    params: int


def tucker_entries(conv: nn.Conv2d, param_ratios: Iterable[float] = (0.75, 0.5, 0.3, 0.15),
                   sweeps: int = 2) -> list[TuckerEntry]:
    """Search-database entries of a Conv2d (groups=1) under Tucker-2 at each parameter budget.

    >>> [e.ranks for e in tucker_entries(nn.Conv2d(16, 32, 3), param_ratios=[0.5])]
    [(18, 9)]
    """
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise UnsupportedModuleError(f"tucker_entries: {type(conv).__name__} is not a Conv2d with groups=1")
    K = conv.weight.detach()
    T, S = K.shape[:2]
    total = max(float((K.to(torch.float64) ** 2).sum()), 1e-300)
    out = []
    for ratio in param_ratios:
        r_out, r_in = choose_tucker_ranks(K, LowRank(param_ratio=ratio))
        loss = float(((reconstruct(*tucker2(K, r_out, r_in, sweeps)) - K.to(torch.float64)) ** 2).sum())
        out.append(TuckerEntry((r_out, r_in), loss, loss / total, tucker2_params(T, S, K[0, 0].numel(), r_out, r_in)))
    return out
