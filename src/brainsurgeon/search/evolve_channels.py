"""Evolutionary channel search on a real model: genomes are keep-masks over the dependency graph's groups.

Candidates are scored on the model with the dropped channels ZEROED (every parameter slice of the group:
the producers' output rows, their BatchNorm weight/bias, the consumers' input columns), which computes
what removing them computes; the winner is then removed physically by the graph's verified surgery
(``DependencyGraph.prune``, what ``prune_`` runs)::

    >>> space = ChannelSpace(model, example_inputs=x, ignore=("fc",))
    >>> def fitness(model, genome):                     # the model is masked by `genome` here
    ...     return accuracy(model) - 2.0 * max(0.0, space.macs_fraction(genome) - 0.5)
    >>> best = evolve_channels(space, fitness, Evolve(population=16, budget=256), state="ga.pt")
    >>> space.prune_(best.genome)                       # physically smaller, verified
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .evolve import Evolve, GeneticSearch, Individual


class ChannelSpace:
    """A model's prunable channel groups (``DependencyGraph.groups``) as the segments of a genome.

    Groups that are not exact (LayerNorm statistics over the dim) or prune whole multi-channel units
    (attention heads) are left out and listed in ``notes``.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> None:
        from ..graph import DependencyGraph
        from ..prune.costs import measure

        self.model, self.example = model, example_inputs
        pats = [re.compile(p) for p in ignore]
        ignored = [n for n, _ in model.named_modules() if n and any(p.fullmatch(n) for p in pats)]
        self.graph = DependencyGraph(model, example_inputs)
        self.notes: list[str] = []
        self.groups = []
        for g in self.graph.groups(ignore=tuple(ignored)):
            if not g.exact or int(getattr(g, "unit", 1)) != 1:
                self.notes.append(f"group rooted at {g.root.name}: "
                                  f"{'inexact' if not g.exact else f'units of {g.unit}'}; left out")
            else:
                self.groups.append(g)
        if not self.groups:
            raise ConfigError(f"ChannelSpace: {type(model).__name__} has no prunable channel group after "
                              f"ignore={list(ignore)}; loosen ignore ({'; '.join(self.notes) or 'see g.report()'})")
        self.segments = [g.n for g in self.groups]
        self.macs = {k: v for k, v in measure(model, example_inputs).macs.items() if v}
        params = dict(model.named_parameters())
        self._slices = [[s for s in g.slices if s.name in params] for g in self.groups]  # parameters only

    def __repr__(self) -> str:
        return f"ChannelSpace({len(self.groups)} groups, {sum(self.segments)} channels)"

    def split(self, genome: torch.Tensor) -> list[torch.Tensor]:
        """The genome (bool, sum(segments)) cut per group."""
        return list(torch.as_tensor(genome, dtype=torch.bool).split(self.segments))

    def dense_genome(self) -> torch.Tensor:
        return torch.ones(sum(self.segments), dtype=torch.bool)

    @contextmanager
    def masked(self, genome: torch.Tensor) -> Iterator[nn.Module]:
        """The model with the dropped channels zeroed; every zeroed value is restored on exit.

        >>> with space.masked(genome) as m:
        ...     score = evaluate(m, val)
        """
        saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for bits, slices in zip(self.split(genome), self._slices, strict=True):
                    drop = (~bits).nonzero().reshape(-1)
                    if not drop.numel():
                        continue
                    for s in slices:
                        t = getattr(self.model.get_submodule(s.module), s.tensor)
                        idx = s.idxs[drop].reshape(-1)  # (dropped rows * k,) positions along s.dim
                        saved.append((t, s.dim, idx, t.index_select(s.dim, idx).clone()))
                        t.index_fill_(s.dim, idx, 0.0)
            yield self.model
        finally:
            with torch.no_grad():
                for t, d, idx, old in reversed(saved):
                    t.index_copy_(d, idx, old)

    @contextmanager
    def adapted(self, genome: torch.Tensor, batches: Iterable[Any]) -> Iterator[nn.Module]:
        """``masked(genome)`` with the BatchNorm running statistics re-estimated on `batches` (adaptive BN,
        Li et al., "EagleEye", ECCV 2020): dropping channels shifts the statistics the remaining layers see,
        and a candidate judged with the dense model's statistics looks broken before any fine-tuning.

        The model is in eval mode inside (the new statistics are used); the statistics, momenta and
        train/eval modes are restored on exit with the zeroed values.

        >>> with space.adapted(genome, [x_cal]) as m:
        ...     score = evaluate(m, val)
        """
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        modes = [(m, m.training) for m in self.model.modules()]
        saved = [(m, m.momentum, {k: getattr(m, k).clone() for k in ("running_mean", "running_var",
                                                                      "num_batches_tracked")}) for m in bns]
        try:
            with self.masked(genome) as model:
                with torch.no_grad():
                    self.model.eval()
                    for m in bns:
                        m.reset_running_stats()
                        m.momentum = None  # cumulative average over the batches
                        m.train()
                    seen = 0
                    for xb in batches:
                        model(*xb) if isinstance(xb, tuple | list) else model(xb)
                        seen += 1
                    if bns and not seen:
                        raise ConfigError("ChannelSpace.adapted: no batch to re-estimate the BatchNorm "
                                          "statistics on; pass at least one input batch, or use masked()")
                self.model.eval()
                yield model
        finally:
            with torch.no_grad():
                for m, mom, bufs in saved:
                    m.momentum = mom
                    for k, v in bufs.items():
                        getattr(m, k).copy_(v)
            for m, was in modes:
                m.training = was

    def macs_fraction(self, genome: torch.Tensor) -> float:
        """Estimated MACs of the pruned model / dense, over the layers with MACs: each layer's dense MACs
        times the kept fraction of its output and of its input channels (measured after ``prune_``)."""
        removed: dict[tuple[str, str], int] = {}
        for bits, g in zip(self.split(genome), self.groups, strict=True):
            drop = int((~bits).sum())
            for s in g.slices:
                if s.tensor == "weight" and s.role in ("out", "in") and drop:
                    key = (s.module, s.role)
                    removed[key] = removed.get(key, 0) + drop * int(s.idxs.shape[1])
        total = kept = 0.0
        for name, macs in self.macs.items():
            mod = self.model.get_submodule(name)
            frac = 1.0
            for role, dim in (("out", _out_dim(mod)), ("in", 1 - _out_dim(mod))):
                if (name, role) in removed and not (role == "in" and _grouped(mod)):  # depthwise: rows only
                    frac *= 1.0 - removed[(name, role)] / mod.weight.shape[dim]
            total += macs
            kept += macs * frac
        return kept / max(total, 1.0)

    def l1_genome(self, keep: float) -> torch.Tensor:
        """Uniform L1-norm pruning as a genome: in every group keep the ceil(keep * n) channels whose producer
        output rows have the largest L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017)."""
        out = []
        for g, slices in zip(self.groups, self._slices, strict=True):
            score = torch.zeros(g.n)
            for s in slices:
                if s.role == "out" and s.tensor == "weight":
                    t = getattr(self.model.get_submodule(s.module), s.tensor).detach()
                    per = t.abs().transpose(0, s.dim).reshape(t.shape[s.dim], -1).sum(1)  # (dim,)
                    score += per[s.idxs].sum(1)
            bits = torch.zeros(g.n, dtype=torch.bool)
            bits[score.argsort(descending=True)[:max(1, math.ceil(keep * g.n - 1e-9))]] = True
            out.append(bits)
        return torch.cat(out)

    def prune_(self, genome: torch.Tensor) -> list[str]:
        """Remove the dropped channels physically with the graph's verified surgery; returns one note per group.

        On a verification failure the model is restored and ``SurgeryError`` raised (``DependencyGraph.prune``).
        """
        chosen, notes = [], []
        for bits, g in zip(self.split(genome), self.groups, strict=True):
            drop = (~bits).nonzero().reshape(-1)
            if drop.numel():
                chosen.append(g.select(drop))
                notes.append(f"{g.root.module}: {g.n} -> {g.n - drop.numel()} channels")
        if chosen:
            self.graph.prune(chosen)
        return notes


def _out_dim(mod: nn.Module) -> int:
    """The weight dim that indexes output channels: 1 for transposed convs (in, out/g, ...), else 0."""
    return 1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) else 0


def _grouped(mod: nn.Module) -> bool:
    return int(getattr(mod, "groups", 1)) > 1


def evolve_channels(space: ChannelSpace, fitness: Callable[[nn.Module, torch.Tensor], float], cfg: Evolve, *,
                    state: str | os.PathLike[str] | None = None, seeds: Sequence[torch.Tensor] = ()) -> Individual:
    """Run the GA over `space`; ``fitness(model, genome)`` is called with the model masked by `genome`.

    seeds: genomes put into the initial population (e.g. ``space.l1_genome(0.5)``). The model is left
    unchanged; apply the winner with ``space.prune_(best.genome)``.

    >>> best = evolve_channels(space, lambda m, g: -loss(m) - space.macs_fraction(g), Evolve(budget=128))
    """
    def score(genome: torch.Tensor) -> float:
        with space.masked(genome) as m:
            return float(fitness(m, genome))

    return GeneticSearch(cfg, space.segments, seeds).run(score, state)
