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
import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._log import get_logger
from ._state import ModelSnapshot
from .calib import (
    auto_shrinkage,
    correct_mean_std_,
    num_groups,
    prepare_calibration,
    reestimate_batchnorm_,
    run_layerwise,
    supported,
)
from .calib.heldout import capture_heldout
from .calib.regimes import calibration_mixed
from .config import (
    DECOUPLE_AUTO,
    GPTQ,
    GUARD_SINGLES,
    RTN,
    CalibOptions,
    Config,
    Recipe,
    Step,
    _as_overrides,
    as_patterns,
    load_recipe,
    match_configs,  # noqa: F401 - re-exported (planners and tests import it from here)
)
from .errors import ConfigError
from .obs import compress_weight, is_data_free
from .obs.guard import guard_rows
from .obs.heldout import SHRINK_GRID, gptq_solver, select_shrinkage
from .obs.hessian import layer_loss
from .planning import _layer_weight, _set_layer_weight, check_step, plan_layers  # noqa: F401 - re-exported
from .report import CompressionReport, LayerRow

log = get_logger(__name__)


def _levels(W: torch.Tensor, group_size: int) -> int:
    """Largest number of distinct values in one row (or row-group) of W (rows x cols)."""
    if group_size:
        pad = (-W.shape[1]) % group_size
        W = torch.nn.functional.pad(W, (0, pad)).reshape(-1, group_size)
    s = W.sort(dim=1).values
    return int((1 + (s[:, 1:] != s[:, :-1]).sum(1)).max())


def _run_step(model: nn.Module, step: Step, calib: Any, options: CalibOptions,
              report: CompressionReport, snapshot: ModelSnapshot | None = None) -> list[str]:
    """One weight step; each layer's new weight goes in through `snapshot` (copy-on-write) when given."""
    plan = plan_layers(model, step, report.notes, options=options)
    decoupled: list[str] = []
    guarded = [n for n, c in plan.items() if isinstance(c, GPTQ) and c.guard == "auto"]
    if guarded and calib is not None and options.regime_shares and not options.heldout_singles:
        options = dataclasses.replace(options, heldout_singles=GUARD_SINGLES)  # forwarded, in no H
    held: dict[str, Any] = {}  # "inputs": calib.heldout.HeldoutInputs while the driver runs
    swapped: list[tuple[str, int, int]] = []

    def resolved(name: str) -> Config:
        """The layer's config with GPTQ's decouple="auto" decided: on where the calibration was mixed (encoders)."""
        cfg = plan[name]
        if getattr(cfg, "decouple", None) != "auto":
            return cfg
        return dataclasses.replace(cfg, decouple=DECOUPLE_AUTO if calibration_mixed() else 0.0)

    def solve(name: str, module: nn.Module, H: torch.Tensor | None) -> None:
        cfg = resolved(name)
        W = _layer_weight(module)
        g = num_groups(module)
        Hs = [None] * g if H is None else (H if H.dim() == 3 else H.unsqueeze(0))
        parts = [compress_weight(Wg, Hs[i], cfg, name) for i, Wg in enumerate(W.chunk(g, dim=0))]
        W_hat = parts[0].weight if g == 1 else torch.cat([p.weight for p in parts])
        loss = sum(p.loss for p in parts)
        rel = sum(p.info["rel_loss"] for p in parts) / g
        known = [p.info.get("levels") for p in parts]  # solvers that hold the codes count in linear time
        X = held["inputs"].take(name) if "inputs" in held and name in guarded else None
        if X is not None and g == 1 and W.dim() == 2 and calibration_mixed():  # GPTQ guard="auto" (obs.guard)
            rtn = RTN(bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size, mse=cfg.mse)
            W_hat, worse = guard_rows(W, W_hat, compress_weight(W, None, rtn, name).weight, X)
            swapped.append((name, int(worse.sum()), len(worse)))
            if bool(worse.any()):
                loss, rel = layer_loss(W, W_hat, Hs[0])
                known = [None]
        _set_layer_weight(module, W_hat, snapshot)
        bits = float(getattr(cfg, "bits", torch.finfo(W.dtype).bits))
        W2 = W_hat.reshape(W_hat.shape[0], -1)
        levels = (max(known) if all(k is not None for k in known) else _levels(W2, getattr(cfg, "group_size", 0))
                  ) if hasattr(cfg, "bits") else 0
        report.add_row(LayerRow(
            name=name, method=cfg.describe(), shape=tuple(W.shape), params=W.numel(),
            nonzeros=sum(p.info["nonzeros"] for p in parts), bits=bits, loss=loss, rel_loss=rel,
            seconds=sum(p.seconds for p in parts), damp_retries=sum(p.info["damp_retries"] for p in parts),
            dead_inputs=sum(p.info["dead_inputs"] for p in parts), levels=levels))
        if any(p.info.get("decoupled") for p in parts):
            decoupled.append(f"{name} ({sum(p.info['decoupled'] for p in parts)})")
        for w in dict.fromkeys(p.info.get("warning", "") for p in parts):
            if w:
                report.notes.append(w)
        log.info("%s: %s rel.err %.3e in %.2fs", name, cfg.describe(), rel, report.rows[-1].seconds)

    if calib is None:  # data-free configs only (checked by _verb_step): no data, no forward pass
        modules = dict(model.named_modules())
        for name in plan:
            solve(name, modules[name], None)
        report.notes.append(f"{step.method.describe()}: data-free (no calibration data, no forward pass); "
                            f"loss = ||dW||^2 in weight space")
        return list(plan)
    inside, outside = _split_blocks(model, list(plan), options.blocks)
    heldout: list[str] = []

    def select(name: str, module: nn.Module, folds: list, lam_spread: float) -> float:
        """shrink='heldout' on a singular H: the intensity by held-out loss over two folds (obs.heldout)."""
        if plan[name].shrink != "heldout":  # "auto": Schaefer-Strimmer's estimate
            return lam_spread
        W = _layer_weight(module)
        lam, _ = select_shrinkage(W.reshape(W.shape[0], -1), folds, gptq_solver(resolved(name), name),
                                  (*SHRINK_GRID, lam_spread))
        heldout.append(name)
        return lam

    any_heldout = any(getattr(c, "shrink", None) == "heldout" for c in plan.values())  # else no fold buffers
    modules = dict(model.named_modules())
    with (auto_shrinkage(lambda name: getattr(plan.get(name), "shrink", None) in ("auto", "heldout"),
                         select if any_heldout else None) as shrunk,
          capture_heldout({n: modules[n] for n in guarded}) as held["inputs"]):
        report.notes.extend(run_layerwise(model, inside, calib, solve, options) or [])
        if outside:  # after the blocks, on the compressed blocks' outputs (GPTQ's sequential order)
            report.notes.append(f"{len(outside)} layer(s) outside the blocks {options.blocks!r} "
                                f"({', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}) compressed in a "
                                f"final per-layer pass after the blocks; pass ignore=[...] to keep them dense")
            final = dataclasses.replace(options, blocks="", offload=False)
            report.notes.extend(n for n in run_layerwise(model, outside, calib, solve, final) if n not in report.notes)
    if decoupled:
        report.notes.append(f"GPTQ decouple: the massive-activation input columns (H_jj > k median(diag H)) of "
                            f"{len(decoupled)} layer(s) rounded to nearest with no error spread from them "
                            f"({', '.join(decoupled[:4])}{', ...' if len(decoupled) > 4 else ''}; columns in "
                            f"brackets); decouple='auto' does this on encoders (bidirectional, calibration mixed), "
                            f"GPTQ(decouple=0) turns it off")
    if swapped:
        hit = [f"{n} ({k}/{r})" for n, k, r in swapped if k]
        report.notes.append(f"GPTQ guard: on {options.heldout_singles} held-out single-token inputs (vocabulary ids "
                            f"disjoint from the Hessians' singles, kept out of every H), "
                            f"{sum(k for _, k, _ in swapped)} of {sum(r for _, _, r in swapped)} rows in {len(hit)} "
                            f"of {len(swapped)} layer(s) had "
                            f"more output error than round-to-nearest on the same grid and took its row"
                            + (f" ({', '.join(hit[:4])}{', ...' if len(hit) > 4 else ''})" if hit else "")
                            + "; GPTQ(guard=False) turns it off")
    if shrunk:
        lam = [x for _, x in shrunk]
        report.notes.append(f"shrink='auto'/'heldout': {len(lam)} Hessian(s) shrunk toward their diagonal, intensity "
                            f"{min(lam):.3f}-{max(lam):.3f} (mean {sum(lam) / len(lam):.3f}), estimated from the "
                            f"spread of the calibration samples"
                            + (f"; {len(heldout)} with fewer calibration rows than columns (singular H) chosen "
                               f"by held-out loss over two folds of the samples" if heldout else ""))
    return list(plan)


def _split_blocks(model: nn.Module, names: list[str], path: str) -> tuple[list[str], list[str]]:
    """Planned layers inside ``model.<path>[i]`` and the rest (all inside without block mode)."""
    try:
        n = len(model.get_submodule(path)) if path else 0
    except (AttributeError, TypeError):
        n = 0  # a bad path: the driver raises its own clear error
    if not n:
        return names, []
    def inside(name: str) -> bool:
        head = name[len(path) + 1:].partition(".")[0] if name.startswith(path + ".") else ""
        return head.isdigit() and int(head) < n
    return [x for x in names if inside(x)], [x for x in names if not inside(x)]


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
STRUCTURAL_VERBS = ("prune", "factorize", "share", "pack", "transform")


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
    elif verb == "transform":  # compact-design transforms (Separable)
        from .lowrank import transform_

        report.extend(transform_(model, step.method, calib, ignore=step.ignore, overrides=step.overrides))
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


def _compress_steps(model: nn.Module, steps: Iterable[Step], calib: Any, options: CalibOptions,
                    data: Any = None, val: Any = None, verb_name: str = "compress") -> CompressionReport:
    """Run steps in place; on any failure restore the model as it was, then re-raise.

    The rollback restores in place (:class:`~brainsurgeon._state.ModelSnapshot`, copy-on-write: weight
    steps give each layer new storage and copy nothing; other steps keep copies first): the caller's
    Parameter and Module objects, hooks, flags and grads survive a failure. A recipe with a distill
    step also keeps a deep copy, the distill steps' teacher (the model before the recipe).
    """
    steps = list(steps)
    for i, step in enumerate(steps, 1):
        verb = type(step.method).verb
        if verb not in ("sparsify", "quantize", "distill", "actquant") + STRUCTURAL_VERBS:
            raise ConfigError(f"{type(step.method).__name__} is a {verb!r} config, which a recipe step cannot "
                              f"run; recipe steps take sparsify, quantize, prune, factorize, transform, share, pack or "
                              f"distill configs")
        if verb == "distill":
            _check_distill_step(i, step, data)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{verb_name} needs an nn.Module as model, got {type(model).__name__}")
    if not isinstance(options, CalibOptions):
        raise ConfigError(f"{verb_name}: options must be a CalibOptions (e.g. CalibOptions(mode='dense')), "
                          f"got {options!r}")
    if options.blocks:  # a path naming no block list is refused before any calibration
        from .calib.blocks import _blocks

        _blocks(model, options.blocks)
    structural = any(type(s.method).verb in STRUCTURAL_VERBS + ("distill",) for s in steps)
    snapshot = ModelSnapshot(model, to_cpu=not structural)  # copy-on-write: weight steps copy nothing
    modes = {m: m.training for m in model.modules()}  # every submodule's flag, not only the root's
    calib_notes: list[str] = []
    if calib is not None or any(type(s.method).verb == "prune" or (type(s.method).verb in ("sparsify", "quantize")
                                and not _data_free(s)) for s in steps):
        snapshot.keep(list(model.buffers()))  # forwards run in eval mode, but a custom module may update a buffer
        stop = [m for m in model.modules() if supported(m)] if options.blocks else None
        try:
            calib, calib_notes = prepare_calibration(model, calib, verb_name, max_batches=options.max_batches,
                                                     stop_after=stop)
        except BaseException:
            snapshot.restore_()
            raise
    teacher = copy.deepcopy(model) if any(type(s.method).verb == "distill" for s in steps) else None
    dense = copy.deepcopy(model) if options.correct_mean_std and not structural else None
    report = CompressionReport()
    report.notes += calib_notes
    try:
        names: list[str] = []
        for step in [s for s in steps if type(s.method).verb == "actquant"]:  # first: later Hessians see X_q
            snapshot.keep_all()  # SmoothQuant folds scales into weights in place
            names += [n for n in _run_act_step(model, step, calib, options, report) if n not in names]
        for step in steps:
            if type(step.method).verb == "actquant":
                continue
            if type(step.method).verb != "sparsify" and type(step.method).verb != "quantize":
                snapshot.keep_all()  # training and structural verbs may write any tensor in place
            if type(step.method).verb == "distill":
                _run_distill_step(model, step, teacher, data, val, report)  # type: ignore[arg-type]
            elif type(step.method).verb in STRUCTURAL_VERBS:
                _run_structural_step(model, step, calib, report)
            else:
                names += [n for n in _run_step(model, step, calib, options, report, snapshot) if n not in names]
        if structural and options.correct_mean_std:
            report.notes.append("mean/std correction skipped: the recipe changes layer shapes")
        if options.bn_reestimate or dense is not None:
            snapshot.keep_all()  # statistics and biases are corrected in place
        _recalibrate(model, dense, names, calib, options, report)
    except BaseException:
        snapshot.restore_()
        raise
    for m, mode in modes.items():  # a verb that restored only the root's train/eval flag leaves no trace
        m.training = mode
    return report


def _run_act_step(model: nn.Module, step: Step, calib: Any, options: CalibOptions,
                  report: CompressionReport) -> list[str]:
    """Input quantizers on the step's layers, calibrated on `calib` (see :mod:`brainsurgeon.quant.act`)."""
    from .quant.act import insert_act_quant_

    names = [n for n, mod in model.named_modules() if n and supported(mod)]
    plan = match_configs(names, step.method, step.ignore, step.overrides)
    if not plan:
        raise ConfigError(f"ActQuant: no Linear/Conv layer is left in {type(model).__name__} after "
                          f"ignore={list(step.ignore)}; loosen ignore")
    eq = {c.equalize for c in plan.values()}  # type: ignore[attr-defined]
    if eq - {0.0}:
        from .quant.equalize import equalize_

        if len(eq) > 1:
            raise ConfigError(f"ActQuant: one cross-layer equalization strength per step, got "
                              f"equalize={sorted(eq)}; use one value")
        pairs = equalize_(model, calib, eq.pop(), names=list(plan), max_batches=options.max_batches)
        report.notes.append(f"cross-layer equalization: {len(pairs)} BatchNorm/conv -> conv pairs folded")
    alphas = {c.smooth for c in plan.values()}  # type: ignore[attr-defined]
    if alphas - {0.0}:
        from .quant.smooth import smooth_quant_

        if len(alphas) > 1:
            raise ConfigError(f"ActQuant: one SmoothQuant strength per step, got smooth={sorted(alphas)}; "
                              f"use one value")
        pairs = smooth_quant_(model, calib, alphas.pop(), names=list(plan), max_batches=options.max_batches)
        report.notes.append(f"SmoothQuant: {len(pairs)} norms folded into {sum(map(len, pairs.values()))} "
                            f"Linear layers")
    done = insert_act_quant_(model, plan, calib, options.max_batches)  # type: ignore[arg-type]
    kinds = sorted({c.describe() for c in plan.values()})
    report.notes.append(f"{', '.join(kinds)}: inputs of {len(done)} layers quantized before the weight steps "
                        f"(their Hessians are built from the quantized inputs)")
    return done


def _verb_step(cfg: Config, verb: str, ignore: Iterable[str], overrides: Any) -> Step:
    ok = (verb, "actquant") if verb == "quantize" else (verb,)
    if not isinstance(cfg, Config) or type(cfg).verb not in ok:
        raise ConfigError(f"{verb}_ needs a {verb} config (e.g. "
                          f"{'ExactOBS(sparsity=0.5)' if verb == 'sparsify' else 'OBQ(bits=4)'}), "
                          f"got {cfg!r}")
    return Step(cfg, as_patterns(ignore), _as_overrides(overrides))


def _data_free(step: Step) -> bool:
    """Every config of the step (its method and overrides) runs without calibration data (RTN, Magnitude)."""
    return all(is_data_free(c) for c in (step.method, *(c for _, c in step.overrides)))


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
    return _compress_steps(model, [step], calib, options, verb_name="sparsify_")


def quantize_(model: nn.Module, cfg: Config, calib: Any = None, *, ignore: Iterable[str] = (),
              overrides: Any = (), options: CalibOptions | None = None) -> CompressionReport:
    """Quantize the weights of every supported layer in place (OBQ, GPTQ, RTN), or with an
    :class:`~brainsurgeon.config.ActQuant` config their inputs (calibrated input quantizers).

    Weights stay float tensors whose values lie on the grid (2^bits levels per row or group);
    zeros of an already pruned layer stay zero.

    >>> rep = quantize_(model, OBQ(bits=4), calib=loader)
    >>> rep = quantize_(model, ActQuant(bits=8, observer="mse"), calib=loader)   # then GPTQ sees X_q
    """
    options = options or CalibOptions()
    step = _verb_step(cfg, "quantize", ignore, overrides)
    _check_calib(step, calib)
    return _compress_steps(model, [step], calib, options, verb_name="quantize_")


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
