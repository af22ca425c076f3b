"""Which layers a weight step (sparsify/quantize) compresses, with which config, and what it refuses.

    >>> plan_layers(model, Step(ExactOBS(sparsity=0.5), ignore=("fc3",)))
    {'conv1': ExactOBS(...), 'fc1': ExactOBS(...), ...}
    >>> plan, notes, refusals = check_step(model, Step(ExactOBS(pattern="2:4")))   # every refusal

The verbs (``api``) and ``compress --dry-run`` plan with the same function, so a dry run
reports exactly what the real run would refuse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._hf import embedding
from ._log import get_logger
from ._state import ModelSnapshot
from .calib import num_groups, set_weight_matrix_, supported, weight_matrix
from .calib.hessian import _is_hf_conv1d
from .config import CalibOptions, Config, Step, compile_patterns, match_configs
from .errors import BrainsurgeonError, ConfigError, UnsupportedModuleError
from .obs.engine import column_perm

log = get_logger(__name__)


def _layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the solvers see it: conv kernels keep their shape, Linear/Conv1D rows x cols."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight.detach()
    return weight_matrix(module).detach()


def _set_layer_weight(module: nn.Module, W: torch.Tensor, snapshot: ModelSnapshot | None = None) -> None:
    """Write W (as :func:`_layer_weight` gives it) into the module's weight; through `snapshot`'s
    copy-on-write :meth:`~brainsurgeon._state.ModelSnapshot.write_` when given (no copy of the old values)."""
    if snapshot is None:
        if isinstance(module, nn.modules.conv._ConvNd):
            with torch.no_grad():
                module.weight.copy_(W)
        else:
            set_weight_matrix_(module, W)
        return
    ref = weight_matrix(module)
    if tuple(W.reshape(W.shape[0], -1).shape) != tuple(ref.shape):
        raise ConfigError(f"{type(module).__name__}: weight matrix must have shape {tuple(ref.shape)}, "
                          f"got {tuple(W.shape)}")
    snapshot.write_(module.weight, W.t().contiguous() if _is_hf_conv1d(module) else W)  # Conv1D: (in, out)


def _weight_key(w: torch.Tensor) -> Any:
    """Two weights with the same key are one tensor (the same Parameter, or views of one storage)."""
    if w.is_meta or w.numel() == 0:
        return id(w)
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape))


def untie_plan_(model: nn.Module, plan: dict[str, Config], notes: list[str]) -> None:
    """Drop planned layers whose weight another module also uses, with a note for each (in place).

    A weight shared by several planned layers is solved once, as the first of them; a weight tied
    to a module the step does not compress (``lm_head`` tied to the input embedding, an ignored
    layer) is left unchanged, because changing it would silently change that module too.
    """
    users: dict[Any, list[tuple[str, str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, t in mod._parameters.items():
            if t is not None:
                users.setdefault(_weight_key(t), []).append((mname, pname, mod))
    modules = dict(model.named_modules())
    planned = {id(modules[n]): n for n in plan}
    for name in list(plan):
        if name not in plan:
            continue
        mod = modules[name]
        share = [(n, p, m) for n, p, m in users.get(_weight_key(mod.weight), []) if m is not mod]
        if not share:
            continue
        others = [(n, p, m) for n, p, m in share if id(m) not in planned]
        where = ", ".join(f"{n}.{p} ({type(m).__name__})" for n, p, m in share[:4])
        if others:
            for _, _, m in share:
                plan.pop(planned.get(id(m), ""), None)
            plan.pop(name)
            notes.append(f"{name}.weight is tied to {where}, which this step does not compress: left "
                         f"unchanged so the tie holds; untie it first (e.g. "
                         f"{name}.weight = nn.Parameter({name}.weight.detach().clone())) to compress it")
        else:
            for _, _, m in share:
                if planned.get(id(m)) in plan:
                    plan.pop(planned[id(m)])
            notes.append(f"{name}.weight is the same tensor as {where}: solved once, as {name}")
        log.info(notes[-1])


def _skip_note(name: str, shape: tuple[int, ...], cfg: Config) -> str:
    """Why a layer cannot take the step's pattern, and how to change that (one line of the report)."""
    pat = cfg.parsed  # type: ignore[attr-defined]
    size = pat.m if pat.kind == "nm" else pat.block
    what = "input channels per group" if len(shape) > 2 else "input features"
    return (f"{name} {tuple(shape)} kept dense: {what} = {shape[1]} is not divisible by the group size {size} "
            f"of pattern {cfg.pattern!r} (depthwise conv, RGB stem or 1-channel input); add an override with "
            f"an unstructured pattern to sparsify it, ignore=['{name}'] to silence this note, or "
            f"CalibOptions(strict=True) to refuse the run instead")


def output_layer(model: nn.Module) -> str:
    """The model's output layer: HF ``get_output_embeddings()`` (lm_head), else the last Linear (the
    classifier) when it is the last supported layer and not a pooler; "" when there is none.

    >>> output_layer(torchvision.models.mobilenet_v2())
    'classifier.1'
    """
    names = {id(m): n for n, m in model.named_modules() if n and supported(m)}
    out = embedding(model, "output")
    if out is not None:
        return names.get(id(out), "")
    last = [n for n, m in model.named_modules() if n and supported(m)][-1:]
    if last and isinstance(model.get_submodule(last[0]), nn.Linear) and "pooler" not in last[0]:
        return last[0]
    return ""


def _keep_head_(model: nn.Module, plan: dict[str, Config], step: Step, notes: list[str], keep: bool) -> None:
    """Drop the output layer from the plan when `keep` (unless an override names it, it is all there is
    or it shares its weight with another planned layer); a note either way."""
    head = output_layer(model)
    if head not in plan:
        return
    shape = tuple(model.get_submodule(head).weight.shape)
    key = _weight_key(model.get_submodule(head).weight)
    shared = any(_weight_key(model.get_submodule(n).weight) == key for n in plan if n != head)
    named = any(p.fullmatch(head) for p in compile_patterns([p for p, _ in step.overrides], what="overrides"))
    if not keep or len(plan) == 1 or shared or named:
        notes.append(f"{head} {shape} is the model's output layer (classifier / lm_head): compressed; "
                     f"CalibOptions(keep_head=True) keeps it dense, as llm-compressor and GPTQ tools do")
        return
    plan.pop(head)
    notes.append(f"{head} {shape} is the model's output layer (classifier / lm_head): kept dense, as "
                 f"llm-compressor and GPTQ tools do; CalibOptions(keep_head=False) or an override naming "
                 f"'{head}' compresses it")
    log.info(notes[-1])


def check_step(model: nn.Module, step: Step, options: CalibOptions | None = None
               ) -> tuple[dict[str, Config], list[str], list[BrainsurgeonError]]:
    """Plan one weight step exactly as the run will, collecting EVERY refusal instead of stopping at one.

    Returns (plan, notes, refusals): layer name -> config, notes on tied weights and skipped
    layers, and one error per layer the run would refuse (non-float weight, meta weight).
    A layer whose input columns per group the step's N:M / block pattern cannot divide is left
    out of the plan with a note, or, with ``options.strict``, refused; the output layer is kept
    dense when ``options.keep_head`` (see :func:`output_layer`), noted either way.
    ``compress --dry-run`` prints them all; :func:`plan_layers` raises the first.

    >>> plan, notes, refusals = check_step(model, Step(ExactOBS(pattern="2:4")), CalibOptions(strict=True))
    >>> [str(e) for e in refusals]
    ["... conv1 ... is not divisible by the group size 4 ...; pass ignore=['conv1'] ..."]
    """
    names = [n for n, mod in model.named_modules() if n and supported(mod)]
    plan = match_configs(names, step.method, step.ignore, step.overrides,
                         known=[n for n, _ in model.named_modules() if n])
    options = options or CalibOptions()
    notes: list[str] = []
    untie_plan_(model, plan, notes)
    _keep_head_(model, plan, step, notes, options.keep_head)
    if not plan:
        raise ConfigError(f"no supported layer (Linear, Conv1d/2d, HF Conv1D) is left to compress in "
                          f"{type(model).__name__} after ignore={list(step.ignore)}"
                          f"{' and tied weights (' + '; '.join(notes) + ')' if notes else ''}; loosen ignore")
    modules = dict(model.named_modules())
    refusals: list[BrainsurgeonError] = []
    skipped: list[str] = []
    for name, cfg in plan.items():  # validate before any change
        W = _layer_weight(modules[name])
        if not torch.is_floating_point(W):
            refusals.append(UnsupportedModuleError(f"layer {name}: weight dtype {W.dtype} is not floating point; "
                                                   f"pass ignore=['{name}'] or dequantize it first"))
            continue
        if W.is_meta:
            refusals.append(UnsupportedModuleError(f"layer {name}: weight is on the meta device (no values); "
                                                   f"load the weights first or pass ignore=['{name}']"))
            continue
        g = num_groups(modules[name])
        shape = (W.shape[0] // g, *W.shape[1:])
        try:
            column_perm(shape, cfg.parsed if hasattr(cfg, "parsed") else None, name)
        except BrainsurgeonError as e:
            if options.strict:
                refusals.append(e)
            else:
                skipped.append(name)
                notes.append(_skip_note(name, shape, cfg))
                log.info(notes[-1])
    for name in skipped:
        plan.pop(name)
    if skipped and not plan and not refusals:
        raise ConfigError(f"no layer of {type(model).__name__} can take the step's pattern: all {len(skipped)} "
                          f"planned layers have input columns the group size does not divide ({notes[-1]})")
    return plan, notes, refusals


def plan_layers(model: nn.Module, step: Step, notes: list[str] | None = None, *,
                options: CalibOptions | None = None) -> dict[str, Config]:
    """Layer name -> config for one step: supported layers minus `ignore`, with overrides applied.

    Tied/shared weights are solved once or left unchanged (see :func:`untie_plan_`), layers the
    pattern cannot divide and the output layer are kept dense (see `options`); why goes into `notes` when given.
    Raises the first refusal of :func:`check_step`.

    >>> plan_layers(model, Step(ExactOBS(sparsity=0.5), ignore=("fc3",)))
    {'conv1': ExactOBS(...), 'fc1': ExactOBS(...), ...}
    """
    plan, tie_notes, refusals = check_step(model, step, options)
    if refusals:
        raise refusals[0]
    if notes is not None:
        notes += tie_notes
    return plan
