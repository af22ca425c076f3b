"""The in-place verbs and the orchestrator: `sparsify_`, `quantize_`, `compress`.

    >>> import brainsurgeon as bs
    >>> rep = bs.sparsify_(model, bs.ExactOBS(sparsity=0.75), calib=loader, ignore=("fc_out",))
    >>> rep = bs.quantize_(model, bs.OBQ(bits=4), calib=loader)
    >>> rep = bs.compress(model, "recipes/digits-obs75-obq4.yaml", calib=loader)
    >>> rep = bs.compress(model, "recipes/digits-prune-kd-gptq4.yaml", calib=loader, data=train_ds, val=val_ds)
    >>> print(rep.to_table())

Every verb validates everything it can before touching the model, and restores the model's
state if anything fails midway (the caller's model is untouched on failure).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._log import get_logger
from .calib import (
    correct_mean_std_,
    num_groups,
    reestimate_batchnorm_,
    run_layerwise,
    set_weight_matrix_,
    supported,
    weight_matrix,
)
from .config import CalibOptions, Config, Recipe, Step, load_recipe, match_configs
from .errors import ConfigError, UnsupportedModuleError
from .obs import compress_weight, is_data_free
from .obs.engine import column_perm
from .report import CompressionReport, LayerRow

log = get_logger(__name__)


def _layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the solvers see it: conv kernels keep their shape, Linear/Conv1D rows x cols."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight.detach()
    return weight_matrix(module).detach()


def _set_layer_weight(module: nn.Module, W: torch.Tensor) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        with torch.no_grad():
            module.weight.copy_(W)
    else:
        set_weight_matrix_(module, W)


def plan_layers(model: nn.Module, step: Step) -> dict[str, Config]:
    """Layer name -> config for one step: supported layers minus `ignore`, with overrides applied.

    >>> plan_layers(model, Step(ExactOBS(sparsity=0.5), ignore=("fc3",)))
    {'conv1': ExactOBS(...), 'fc1': ExactOBS(...), ...}
    """
    names = [n for n, mod in model.named_modules() if n and supported(mod)]
    plan = match_configs(names, step.method, step.ignore, step.overrides)
    if not plan:
        raise ConfigError(f"no supported layer (Linear, Conv1d/2d, HF Conv1D) is left to compress in "
                          f"{type(model).__name__} after ignore={list(step.ignore)}; loosen ignore")
    modules = dict(model.named_modules())
    for name, cfg in plan.items():  # validate before any change
        W = _layer_weight(modules[name])
        if not torch.is_floating_point(W):
            raise UnsupportedModuleError(f"layer {name}: weight dtype {W.dtype} is not floating point; "
                                         f"pass ignore=['{name}'] or dequantize it first")
        g = num_groups(modules[name])
        shape = (W.shape[0] // g, *W.shape[1:])
        column_perm(shape, cfg.parsed if hasattr(cfg, "parsed") else None, name)
    return plan


def _levels(W: torch.Tensor, group_size: int) -> int:
    """Largest number of distinct values in one row (or row-group) of W (rows x cols)."""
    if group_size:
        pad = (-W.shape[1]) % group_size
        W = torch.nn.functional.pad(W, (0, pad)).reshape(-1, group_size)
    s = W.sort(dim=1).values
    return int((1 + (s[:, 1:] != s[:, :-1]).sum(1)).max())


def _run_step(model: nn.Module, step: Step, calib: Any, options: CalibOptions,
              report: CompressionReport) -> list[str]:
    plan = plan_layers(model, step)

    def solve(name: str, module: nn.Module, H: torch.Tensor | None) -> None:
        cfg = plan[name]
        W = _layer_weight(module)
        g = num_groups(module)
        Hs = [None] * g if H is None else (H if H.dim() == 3 else H.unsqueeze(0))
        parts = [compress_weight(Wg, Hs[i], cfg, name) for i, Wg in enumerate(W.chunk(g, dim=0))]
        W_hat = torch.cat([p.weight for p in parts])
        _set_layer_weight(module, W_hat)
        loss = sum(p.loss for p in parts)
        rel = sum(p.info["rel_loss"] for p in parts) / g
        bits = float(getattr(cfg, "bits", torch.finfo(W.dtype).bits))
        W2 = W_hat.reshape(W_hat.shape[0], -1)
        known = [p.info.get("levels") for p in parts]  # solvers that hold the codes count in linear time
        levels = (max(known) if all(k is not None for k in known) else _levels(W2, getattr(cfg, "group_size", 0))
                  ) if hasattr(cfg, "bits") else 0
        report.add_row(LayerRow(
            name=name, method=cfg.describe(), shape=tuple(W.shape), params=W.numel(),
            nonzeros=sum(p.info["nonzeros"] for p in parts), bits=bits, loss=loss, rel_loss=rel,
            seconds=sum(p.seconds for p in parts), damp_retries=sum(p.info["damp_retries"] for p in parts),
            dead_inputs=sum(p.info["dead_inputs"] for p in parts), levels=levels))
        log.info("%s: %s rel.err %.3e in %.2fs", name, cfg.describe(), rel, report.rows[-1].seconds)

    if calib is None:  # data-free configs only (checked by _verb_step): no data, no forward pass
        modules = dict(model.named_modules())
        for name in plan:
            solve(name, modules[name], None)
        report.notes.append(f"{step.method.describe()}: data-free (no calibration data, no forward pass); "
                            f"loss = ||dW||^2 in weight space")
        return list(plan)
    report.notes.extend(run_layerwise(model, list(plan), calib, solve, options) or [])
    return list(plan)


def _recalibrate(model: nn.Module, dense: nn.Module | None, names: list[str], calib: Any,
                 options: CalibOptions, report: CompressionReport) -> None:
    if options.correct_mean_std and dense is not None:
        shifts = correct_mean_std_(model, dense, names, calib, options.max_batches)
        report.notes.append(f"mean/std correction on {len(shifts)} layers "
                            f"(mean |shift| {sum(shifts.values()) / max(len(shifts), 1):.3g})")
    if options.bn_reestimate:
        n = reestimate_batchnorm_(model, calib, options.max_batches)
        report.notes.append(f"BatchNorm statistics re-estimated on calibration data ({n} layers)")


# Verbs that change module types or shapes (not only weight values): each is its own in-place
# function with its own rollback; compress() snapshots the whole model around them.
STRUCTURAL_VERBS = ("prune", "factorize", "share", "pack")


def _run_structural_step(model: nn.Module, step: Step, calib: Any, report: CompressionReport) -> None:
    import dataclasses

    from .calib import iter_batches

    verb = type(step.method).verb
    if verb == "prune":
        from .prune import prune_

        args, kwargs = next(iter(iter_batches(calib, max_batches=1)))
        cfg = dataclasses.replace(step.method, ignore=tuple(step.method.ignore) + tuple(step.ignore))
        if step.overrides:
            raise ConfigError("a ChannelPruning step takes no per-layer overrides; use its ignore, "
                              "max_layer_ratio or scope fields, or a search plan")
        report.extend(prune_(model, cfg, kwargs or args, calib=calib))
    elif verb == "factorize":
        from .lowrank import factorize_

        report.extend(factorize_(model, step.method, calib, ignore=step.ignore, overrides=step.overrides))
    elif verb == "share":
        from .share import share_

        report.extend(share_(model, step.method, calib, ignore=step.ignore, overrides=step.overrides))
    elif verb == "pack":  # validates every layer before the first swap
        from .quant import pack_

        rows = pack_(model, step.method, ignore=step.ignore)
        report.notes.append(f"{step.method.describe()}: {len(rows)} layers packed, "
                            f"{sum(r.dense_bytes for r in rows):,} -> {sum(r.packed_bytes for r in rows):,} bytes")


def _check_distill_step(index: int, step: Step, data: Any) -> None:
    """Refuse a distill step that cannot run, before the recipe touches the model."""
    name = f"recipe step {index} ({step.method.describe()})"
    if data is None:
        raise ConfigError(f"{name} fine-tunes the model and needs training data; pass "
                          f"compress(model, recipe, calib, data=train_set) (a Dataset or (x, y) batches)")
    if step.ignore or step.overrides:
        raise ConfigError(f"{name} trains the whole model and takes no ignore or overrides; remove them")


def _run_distill_step(model: nn.Module, step: Step, teacher: nn.Module, data: Any, val: Any,
                      report: CompressionReport) -> None:
    """KD fine-tuning (Hinton et al. 2015) from the model as it was before the recipe.

    Pruned channels stay gone, zeros stay zero and, with ``KD(qat=...)``, weights end on their grid
    (see :func:`brainsurgeon.distill.distill`); with `val` the best validation state is kept.
    """
    from .distill import distill

    hist = distill(model, teacher, data, step.method, val=val)  # type: ignore[arg-type]
    note = f"{step.method.describe()}: {hist.steps} steps in {hist.seconds:.1f}s from the model before the recipe"
    if hist.best_metric is not None:
        note += f"; val {hist.val_start:.4f} -> {hist.best_metric:.4f} (best at step {hist.best_step})"
        report.add_metric("distill_val", before=hist.val_start, after=hist.best_metric)
    report.notes.append(note)


def _restore_model_(model: nn.Module, backup: nn.Module) -> None:
    """Put `backup`'s modules, parameters, buffers and attributes back into `model` (same object)."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def _compress_steps(model: nn.Module, steps: Iterable[Step], calib: Any, options: CalibOptions,
                    data: Any = None, val: Any = None) -> CompressionReport:
    """Run steps in place; on any failure restore the model as it was, then re-raise.

    Recipes of weight-value steps only (sparsify/quantize) restore from a CPU copy of the
    state_dict; a recipe with a structural step (prune/factorize/share/pack) or a distill step
    keeps a deep copy, which is also the distill steps' teacher (the model before the recipe).
    """
    steps = list(steps)
    for i, step in enumerate(steps, 1):
        verb = type(step.method).verb
        if verb not in ("sparsify", "quantize", "distill") + STRUCTURAL_VERBS:
            raise ConfigError(f"{type(step.method).__name__} is a {verb!r} config, which a recipe step cannot "
                              f"run; recipe steps take sparsify, quantize, prune, factorize, share, pack or "
                              f"distill configs")
        if verb == "distill":
            _check_distill_step(i, step, data)
    structural = any(type(s.method).verb in STRUCTURAL_VERBS + ("distill",) for s in steps)
    backup = copy.deepcopy(model) if structural else None  # also the teacher of distill steps
    saved = None if structural else {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    dense = copy.deepcopy(model) if options.correct_mean_std and not structural else None
    report = CompressionReport()
    try:
        names: list[str] = []
        for step in steps:
            if type(step.method).verb == "distill":
                _run_distill_step(model, step, backup, data, val, report)  # type: ignore[arg-type]
            elif type(step.method).verb in STRUCTURAL_VERBS:
                _run_structural_step(model, step, calib, report)
            else:
                names += [n for n in _run_step(model, step, calib, options, report) if n not in names]
        if structural and options.correct_mean_std:
            report.notes.append("mean/std correction skipped: the recipe changes layer shapes")
        _recalibrate(model, dense, names, calib, options, report)
    except BaseException:
        if backup is not None:
            _restore_model_(model, backup)
        else:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(saved[k])
        raise
    return report


def _verb_step(cfg: Config, verb: str, ignore: Iterable[str], overrides: Any) -> Step:
    if not isinstance(cfg, Config) or type(cfg).verb != verb:
        raise ConfigError(f"{verb}_ needs a {verb} config (e.g. "
                          f"{'ExactOBS(sparsity=0.5)' if verb == 'sparsify' else 'OBQ(bits=4)'}), "
                          f"got {cfg!r}")
    over = tuple(overrides.items()) if isinstance(overrides, dict) else tuple(overrides)
    return Step(cfg, tuple(ignore), over)


def _check_calib(step: Step, calib: Any) -> None:
    """calib=None is allowed only when every config of the step is data-free (RTN, Magnitude)."""
    if calib is not None:
        return
    needy = sorted({type(c).__name__ for c in (step.method, *(c for _, c in step.overrides)) if not is_data_free(c)})
    if needy:
        raise ConfigError(f"{', '.join(needy)} need(s) calibration data: pass calib=<batches or DataLoader>; "
                          f"only data-free configs (RTN, Magnitude) run with calib=None")


def sparsify_(model: nn.Module, cfg: Config, calib: Any = None, *, ignore: Iterable[str] = (),
              overrides: Any = (), options: CalibOptions | None = None) -> CompressionReport:
    """Prune every supported layer of `model` in place with `cfg` (ExactOBS, SparseGPT, Magnitude).

    ignore: module-name regexes to skip; overrides: ordered {regex: config} (first full match
    wins); options: calibration mode and re-calibration (CalibOptions).

    >>> rep = sparsify_(model, ExactOBS(sparsity=0.75), calib=loader, ignore=("fc3",))
    """
    options = options or CalibOptions()
    step = _verb_step(cfg, "sparsify", ignore, overrides)
    _check_calib(step, calib)
    return _compress_steps(model, [step], calib, options)


def quantize_(model: nn.Module, cfg: Config, calib: Any = None, *, ignore: Iterable[str] = (),
              overrides: Any = (), options: CalibOptions | None = None) -> CompressionReport:
    """Quantize the weights of every supported layer in place (OBQ, GPTQ, RTN).

    Weights stay float tensors whose values lie on the grid (2^bits levels per row or group);
    zeros of an already pruned layer stay zero.

    >>> rep = quantize_(model, OBQ(bits=4), calib=loader)
    """
    options = options or CalibOptions()
    step = _verb_step(cfg, "quantize", ignore, overrides)
    _check_calib(step, calib)
    return _compress_steps(model, [step], calib, options)


def compress(model: nn.Module, recipe: Recipe | str, calib: Any, *, data: Any = None,
             val: Any = None) -> CompressionReport:
    """Apply a recipe (a Recipe, a YAML path or YAML text) in place and return the report.

    data, val: training data and validation data (Datasets or (x, y) batches) for ``distill``
    steps (a :class:`~brainsurgeon.distill.KD` config), which fine-tune the model so far with the
    model as it was before the recipe as teacher; other steps only use `calib`.

    >>> rep = compress(model, "recipes/digits-obs75-obq4.yaml", calib=loader)
    >>> rep = compress(model, "recipes/digits-prune-kd-gptq4.yaml", calib=loader, data=train_ds, val=val_ds)
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return _compress_steps(model, recipe.steps, calib, recipe.calib, data, val)
