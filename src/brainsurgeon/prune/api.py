"""The structural pruning verb ``prune_``: score coupled channel groups, remove the weakest, report.

    >>> import brainsurgeon as bs
    >>> rep = bs.prune_(model, bs.ChannelPruning(ratio=0.5, importance="group_l2"), example_inputs=x)
    >>> rep.metrics["macs"]                  # {'before': ..., 'after': ...}
    >>> rep = bs.prune_(model, bs.ChannelPruning(ratio=0.3, importance="obs", reconstruct="obs"),
    ...                 example_inputs=x, calib=loader)

In place (documented): the model is physically smaller afterwards. On any failure every
module's parameters, buffers and attributes are restored in place (same objects, from an undo log,
no copy of the model) and the error is re-raised.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._state import ModelSnapshot
from ..errors import ConfigError
from ..graph.hf import mark_rebuild_
from ..report import CompressionReport, LayerRow
from .config import ChannelPruning
from .costs import Costs, measure
from .heads import head_dim_sets, pair_groups
from .importance import consumers, importance_needs, score
from .reconstruct import reconstruct_
from .select import select_global, select_local
from .stats import collect_stats

log = get_logger(__name__)


@dataclass
class PruneRow(LayerRow):
    """A :class:`LayerRow` with the structural numbers: params and MACs before and after."""

    params_before: int = 0
    macs_before: int = 0
    macs: int = 0


class KeptIndex:
    """Original indices still present along each pruned (module, tensor, dim), across steps."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.kept = model, {}

    def sizes(self, group: Any) -> dict[tuple[str, str, int], int]:
        """Current sizes of the group's sliced dims (read before pruning, for :meth:`record`)."""
        return {(s.module, s.tensor, s.dim): getattr(self.model.get_submodule(s.module), s.tensor).shape[s.dim]
                for s in group.slices}

    def record(self, removals: list[tuple[Any, torch.Tensor, dict[tuple[str, str, int], int]]]) -> None:
        """Note every ``(group, rows, sizes)`` removed by one step (``sizes``: the dims' sizes before it).

        Every group's positions index the state *before* the step, so removals are collected per
        (module, tensor, dim) over all groups first and applied once: groups that share a dim (two
        branches feeding one ``torch.cat`` consumer) never see each other's shrunk bookkeeping.
        """
        gone: dict[tuple[str, str, int], list[torch.Tensor]] = {}
        size: dict[tuple[str, str, int], int] = {}
        for group, rows, sizes in removals:
            for s in group.slices:
                key = (s.module, s.tensor, s.dim)
                gone.setdefault(key, []).append(s.idxs[rows.to(s.idxs.device)].reshape(-1).cpu())
                size.setdefault(key, sizes[key])
        for key, parts in gone.items():
            cur = self.kept.get(key, torch.arange(size[key]))
            mask = torch.ones(cur.shape[0], dtype=torch.bool)
            mask[torch.cat(parts)] = False
            self.kept[key] = cur[mask]

    def rows(self, module: str) -> torch.Tensor | None:
        """Original output rows a module still has (None: never pruned)."""
        return self.kept.get((module, "weight", 0))


def _root_key(group: Any) -> tuple[str, str, int]:
    return group.root.module, group.root.tensor, group.root.dim


def _prunable(graph: Any, model: nn.Module, cfg: ChannelPruning) -> list[Any]:
    """The graph's groups minus those producing channels in an ignored module."""
    pats = [re.compile(p) for p in cfg.ignore]
    names = {n for n, _ in model.named_modules()}
    for p in pats:
        if not any(p.fullmatch(n) for n in names):
            raise ConfigError(f"ChannelPruning.ignore: pattern {p.pattern!r} matches no module of "
                              f"{type(model).__name__}; names are as in model.named_modules(), e.g. "
                              f"{sorted(n for n in names if n)[:5]}")
    hit: dict[str, bool] = {}   # module name -> matched by a pattern (each name matched once)

    def ignored_name(n: str) -> bool:
        v = hit.get(n)
        if v is None:
            v = hit[n] = any(p.fullmatch(n) for p in pats)
        return v

    ignored = [n for n in names if n and ignored_name(n)]
    groups = graph.groups(ignore=tuple(ignored))
    return [g for g in groups if g.n > 1 and not any(s.role == "out" and ignored_name(s.module) for s in g.slices)]


def _plan(groups: list[Any], scores: list[torch.Tensor], cfg: ChannelPruning, ratio: float,
          n_orig: list[int]) -> list[torch.Tensor]:
    units = [int(getattr(g, "unit", 1)) for g in groups]
    if cfg.scope == "global":
        return select_global(scores, ratio, cfg.max_layer_ratio, n_orig, cfg.round_to, units)
    return [select_local(s, ratio, cfg.round_to, u, "whole", no)
            for s, u, no in zip(scores, units, n_orig, strict=True)]


def _rows(before: Costs, after: Costs, model: nn.Module, cfg: ChannelPruning,
          recon: dict[str, tuple[float, float]]) -> list[PruneRow]:
    out = []
    mods = dict(model.named_modules())
    for name in before.params:
        pa, pb = after.params.get(name, 0), before.params[name]
        ma, mb = after.macs.get(name, 0), before.macs.get(name, 0)
        if (pa, ma) == (pb, mb) and name not in recon:
            continue
        w = getattr(mods.get(name), "weight", None)
        err = recon.get(name, (0.0, 0.0))[1]
        out.append(PruneRow(name=name, method=cfg.describe(), shape=tuple(w.shape) if w is not None else (),
                            params=pa, nonzeros=pa, bits=float(torch.finfo(w.dtype).bits) if w is not None else 32.0,
                            loss=err, rel_loss=err, seconds=0.0, params_before=pb, macs_before=mb, macs=ma))
    return out


def _prune_head_dims(model: nn.Module, cfg: ChannelPruning, example_inputs: Any, calib: Any,
                     report: CompressionReport, train_inputs: Any = None) -> None:
    """Remove ``cfg.head_dim_ratio`` of the dims inside every attention head (weakest first, by
    ``cfg.importance``; q/k and v/o groups paired so every head keeps one head_dim)."""
    from ..graph import DependencyGraph

    graph = DependencyGraph(model, example_inputs, train_inputs=train_inputs)
    sets = head_dim_sets(graph)
    if not sets:
        report.notes.append("head_dim_ratio: no attention module with prunable within-head dims was found")
        return
    stats = collect_stats(model, [g for s in sets for g in s], importance_needs(cfg.importance), calib,
                          cfg.calib_batches)
    report.notes += [n for n in stats.notes if n not in report.notes]
    chosen = []
    for groups in sets:
        scores = [score(cfg.importance, g, stats, cfg) for g in groups]
        if any(s is None for s in scores):
            report.notes.append(f"head dims: {cfg.importance} does not apply to {groups[0].root.module}; left whole")
            continue
        joint, _ = pair_groups(groups, scores)
        k = min(int(round(cfg.head_dim_ratio * joint.n)), joint.n - 1)
        if k:
            chosen.append(joint.select(torch.arange(k)))   # joint rows ascend by summed score
            log.info("head dims: %s %d -> %d rows per head", joint.root.module, joint.n, joint.n - k)
    for grp, why in graph.prune(chosen, skip_failed=True) if chosen else []:
        report.notes.append(f"head dims of {grp.root.module} failed verification and were left whole: {why[:300]}")


def _check_inputs(cfg: Any, example_inputs: Any, calib: Any) -> None:
    if not isinstance(cfg, ChannelPruning):
        raise ConfigError(f"prune_ needs a ChannelPruning config (e.g. ChannelPruning(ratio=0.5)), got {cfg!r}")
    if example_inputs is None:
        raise ConfigError("prune_: example_inputs is required (a Tensor, a tuple of args or a dict of kwargs "
                          "for one forward), e.g. example_inputs=torch.randn(1, 3, 224, 224)")
    if calib is None and cfg.needs_calib:
        what = f"importance={cfg.importance!r}" if importance_needs(cfg.importance) else "reconstruct='obs'"
        raise ConfigError(f"prune_: {what} needs calibration data; pass calib= a DataLoader or a list of "
                          f"batches, or choose a data-free criterion (l1, l2, group_l2, bn_scale, lamp, random)")


def prune_(model: nn.Module, cfg: ChannelPruning, example_inputs: Any, calib: Any = None, *,
           train_inputs: Any = None) -> CompressionReport:
    """Remove channels from `model` in place and return a report with params/MACs before and after.

    Each of ``cfg.steps`` steps traces the model (:class:`~brainsurgeon.graph.DependencyGraph`),
    scores every coupled group with ``cfg.importance``, removes the weakest channels (per group
    or globally) and, with ``reconstruct="obs"``, re-solves each consumer layer against the dense
    model on `calib`. The model's train/eval mode is kept. On failure the model is restored.
    ``train_inputs``: inputs for the train-mode checks when the model needs others there (a detector's
    ``(images, targets)``); default ``example_inputs``.

    >>> rep = prune_(model, ChannelPruning(ratio=0.5, round_to=8), example_inputs=torch.randn(1, 3, 32, 32))
    >>> print(rep.to_table())
    """
    from ..graph import DependencyGraph

    _check_inputs(cfg, example_inputs, calib)
    t0 = time.perf_counter()
    undo = ModelSnapshot(model)   # copy-on-write: surgery replaces .data, it never writes into it
    backup = copy.deepcopy(model) if cfg.reconstruct == "obs" else None   # the dense reference
    report = CompressionReport()
    try:
        before = None
        kept = KeptIndex(model)
        widths: dict[tuple[str, str, int], int] = {}
        recon: dict[str, tuple[float, float]] = {}
        for step in range(1, cfg.steps + 1):
            ratio = cfg.ratio * step / cfg.steps
            graph = DependencyGraph(model, example_inputs, train_inputs=train_inputs)
            before = before or measure(model, example_inputs, trace=graph.traces[0])   # MACs from the trace
            groups = _prunable(graph, model, cfg)
            if step == 1 and graph.untraced:
                report.notes.append("modules never reached by example_inputs (their widths' groups are left "
                                    f"unpruned, see DependencyGraph.report()): {', '.join(sorted(graph.untraced))}")
            stats = collect_stats(model, groups, importance_needs(cfg.importance), calib, cfg.calib_batches)
            report.notes += [n for n in stats.notes if n not in report.notes]   # once, not per step
            scored = [(g, score(cfg.importance, g, stats, cfg)) for g in groups]
            for g, s in scored:
                if s is None:
                    report.notes.append(f"step {step}: {cfg.importance} does not apply to the group rooted at "
                                        f"{g.root.module}.{g.root.tensor}; left unpruned")
            scored = [(g, s) for g, s in scored if s is not None]
            n_orig = [widths.setdefault(_root_key(g), g.n) for g, _ in scored]
            plan = _plan([g for g, _ in scored], [s for _, s in scored], cfg, ratio, n_orig)
            touched: set[str] = set()
            chosen = []
            obs = cfg.reconstruct == "obs"   # only OBS reconstruction reads kept rows and consumer layers
            for (g, _), rows in zip(scored, plan, strict=True):
                if rows.numel():
                    chosen.append((g, rows, g.select(rows), kept.sizes(g) if obs else {}))
            # all groups at once, verified; a group whose removal fails verification is left whole
            failed = graph.prune([sel for _, _, sel, _ in chosen], skip_failed=True) if chosen else []
            for grp, why in failed:
                report.notes.append(f"step {step}: the group rooted at {grp.root.module}.{grp.root.tensor} "
                                    f"failed verification and was left unpruned: {why[:300]}")
                log.info("step %d: %s left unpruned (%s)", step, grp.root.module, why[:120])
            bad = {id(f) for f, _ in failed}
            done = [(g, rows, sizes) for g, rows, sel, sizes in chosen if id(sel) not in bad]
            for g, rows, _ in done:
                if obs:
                    touched |= {name for name, _ in consumers(g, model)}
                log.info("step %d: %s.%s %d -> %d channels", step, g.root.module, g.root.tensor,
                         g.n, g.n - rows.numel())
            if obs:
                kept.record(done)
            if obs and touched:   # writes weights, biases and BN means in place
                undo.keep([t for n in touched for t in model.get_submodule(n).parameters()]
                                 + list(model.buffers()))
                for name, b, a in reconstruct_(model, backup, sorted(touched), calib, kept.rows, cfg.damp,
                                               cfg.calib_batches):
                    recon[name] = (recon.get(name, (b, a))[0], a)
        if cfg.head_dim_ratio > 0:
            _prune_head_dims(model, cfg, example_inputs, calib, report, train_inputs)
        if mark_rebuild_(model):   # HF: the config alone cannot rebuild these widths (or a per-layer record)
            report.notes.append("the HF config cannot express every pruned width (e.g. a width derived from "
                                "hidden_size, or per-layer widths kept in config.brainsurgeon_layer_widths): "
                                "reload with brainsurgeon.export.from_pretrained, which resizes from the saved "
                                "weights, not with the class's own from_pretrained")
        # MACs after: the last graph's trace less the verified removals when the re-run followed it op for op
        planned = graph.planned_shapes() if cfg.head_dim_ratio == 0 else None
        after = measure(model, example_inputs, *planned) if planned else measure(model, example_inputs)
    except BaseException:
        undo.restore_()
        raise
    undo.restore_flags()   # every submodule's train/eval flag, not only the root's
    seconds = time.perf_counter() - t0
    for row in _rows(before, after, model, cfg, recon):
        report.add_row(row)
    report.add_metric("params", before=before.total_params, after=after.total_params)
    report.add_metric("macs", before=before.total_macs, after=after.total_macs)
    report.notes.append(f"{cfg.describe()}: {cfg.steps} step(s) in {seconds:.2f}s")
    if recon:
        b = sum(v[0] for v in recon.values()) / len(recon)
        a = sum(v[1] for v in recon.values()) / len(recon)
        report.notes.append(f"OBS reconstruction of {len(recon)} consumer layers: mean rel. output error "
                            f"{b:.3e} (plain removal) -> {a:.3e}")
    return report
