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

import copy
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
    def adapted(self, genome: torch.Tensor, batches: Iterable[Any],
                memo: dict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> Iterator[nn.Module]:
        """``masked(genome)`` with the BatchNorm running statistics re-estimated on `batches` (adaptive BN,
        Li et al., "EagleEye", ECCV 2020): dropping channels shifts the statistics the remaining layers see,
        and a candidate judged with the dense model's statistics looks broken before any fine-tuning.

        The model is in eval mode inside (the new statistics are used); the statistics, momenta and
        train/eval modes are restored on exit with the zeroed values.

        >>> with space.adapted(genome, [x_cal]) as m:
        ...     score = evaluate(m, val)

        memo: statistics by genome, for a caller that adapts the same genomes on the same batches again (a
        partner scored with every candidate): a genome found there gets its stored statistics without a
        forward; one not found is re-estimated and stored. One memo per `batches` and unchanged weights.
        """
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        modes = [(m, m.training) for m in self.model.modules()]
        saved = [(m, m.momentum, {k: getattr(m, k).clone() for k in ("running_mean", "running_var",
                                                                      "num_batches_tracked")}) for m in bns]
        try:
            key = torch.as_tensor(genome, dtype=torch.bool).numpy().tobytes()
            with self.masked(genome) as model:
                with torch.no_grad():
                    self.model.eval()
                    if memo is not None and key in memo:
                        for m, (mean, var) in zip(bns, memo[key], strict=True):
                            m.running_mean.copy_(mean)
                            m.running_var.copy_(var)
                    else:
                        self._estimate(model, bns, batches)
                        if memo is not None:
                            memo[key] = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
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

    @staticmethod
    def _estimate(model: nn.Module, bns: list[nn.Module], batches: Iterable[Any]) -> None:
        """The BatchNorm layers' running statistics as the cumulative average over `batches` (under no_grad)."""
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

    def macs_fraction(self, genome: torch.Tensor) -> float:
        """Estimated MACs of the pruned model / dense, over the layers with MACs: each layer's dense MACs
        times the kept fraction of its output and of its input channels (measured after ``prune_``)."""
        return self.kept_macs([int(b.sum()) for b in self.split(genome)])

    def kept_macs(self, keep: Sequence[int]) -> float:
        """``macs_fraction`` of any genome keeping keep[g] channels of group g (it depends on the counts only)."""
        removed: dict[tuple[str, str], int] = {}
        for k, g in zip(keep, self.groups, strict=True):
            drop = g.n - int(k)
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

    def l1_scores(self) -> list[torch.Tensor]:
        """Per group, each channel's L1 norm summed over its producers' output rows (Li et al. 2017)."""
        out = []
        for g, slices in zip(self.groups, self._slices, strict=True):
            score = torch.zeros(g.n)
            for s in slices:
                if s.role == "out" and s.tensor == "weight":
                    t = getattr(self.model.get_submodule(s.module), s.tensor).detach()
                    per = t.abs().transpose(0, s.dim).reshape(t.shape[s.dim], -1).sum(1)  # (dim,)
                    score += per[s.idxs].sum(1)
            out.append(score)
        return out

    def l1_genome(self, keep: float) -> torch.Tensor:
        """Uniform L1-norm pruning as a genome: in every group keep the ceil(keep * n) channels whose producer
        output rows have the largest L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017)."""
        out = []
        for g, score in zip(self.groups, self.l1_scores(), strict=True):
            bits = torch.zeros(g.n, dtype=torch.bool)
            bits[score.argsort(descending=True)[:max(1, math.ceil(keep * g.n - 1e-9))]] = True
            out.append(bits)
        return torch.cat(out)

    def fit_counts(self, keep: Sequence[int], target: float) -> list[int]:
        """Per-group channel counts with the shape of `keep` whose MACs fraction is <= target and maximal.

        The counts are scaled by one common factor (``floor(s * keep[g])``, at least 1; the largest s that
        fits, by bisection), so the allocation across groups is kept; then single channels are added while
        one fits, to the group whose scaled count lost the most to rounding (the budget is met up to one
        channel)."""
        n = self.segments
        k0 = [min(max(1, int(v)), m) for v, m in zip(keep, n, strict=True)]
        if self.kept_macs([1] * len(n)) > target:
            raise ConfigError(f"ChannelSpace.fit_counts: one channel per group already costs "
                              f"{self.kept_macs([1] * len(n)):.4f} of the MACs > target={target}; raise target")

        def scaled(s: float) -> list[int]:
            return [min(m, max(1, math.floor(s * v + 1e-9))) for v, m in zip(k0, n, strict=True)]

        lo, hi = 0.0, max(m / v for v, m in zip(k0, n, strict=True))
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.kept_macs(scaled(mid)) <= target else (lo, mid)
        k = scaled(lo)
        while True:
            fits = [i for i in range(len(n)) if k[i] < n[i]
                    and self.kept_macs([v + (j == i) for j, v in enumerate(k)]) <= target]
            if not fits:
                return k
            k[max(fits, key=lambda i: (lo * k0[i] - k[i], -i))] += 1

    def budget_repair(self, target: float, *, ranked: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """A ``GeneticSearch`` repair: every genome meets the MACs budget `target` exactly (``fit_counts`` on
        its per-group counts). ranked=True keeps the top-k L1 channels of each group, so the search is over
        per-group widths (the genome's count per group; crossover averages widths, mutation nudges them);
        ranked=False keeps the genome's own channels, dropping the lowest-L1 kept ones / adding the
        highest-L1 dropped ones to meet the counts (the search also chooses which channels).

        >>> best = GeneticSearch(cfg, space.segments, [seed], repair=space.budget_repair(0.25)).run(fit)
        """
        ranks = [s.argsort(descending=True) for s in self.l1_scores()]
        self.fit_counts([1] * len(self.segments), target)  # refuse an impossible target now

        def repair(genome: torch.Tensor) -> torch.Tensor:
            bits = self.split(genome)
            keep = self.fit_counts([int(b.sum()) for b in bits], target)
            out = []
            for b, k, order in zip(bits, keep, ranks, strict=True):
                new = torch.zeros_like(b) if ranked else b.clone()
                if ranked:
                    new[order[:k]] = True
                else:
                    kept, dropped = order[b[order]], order[~b[order]]  # each in descending L1
                    new[kept[k:]] = False
                    new[dropped[:max(0, k - len(kept))]] = True
                out.append(new)
            return torch.cat(out)

        return repair

    def pruned(self, genome: torch.Tensor) -> nn.Module:
        """A physically pruned copy of the model (``prune_`` on a deep copy of the space); the model is unchanged.

        >>> small = space.pruned(genome)                    # train it, measure it; space.model stays dense
        """
        other = copy.deepcopy(self)
        other.prune_(genome)
        return other.model

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
                    state: str | os.PathLike[str] | None = None, seeds: Sequence[torch.Tensor] = (),
                    repair: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Individual:
    """Run the GA over `space`; ``fitness(model, genome)`` is called with the model masked by `genome`.

    seeds: genomes put into the initial population (e.g. ``space.l1_genome(0.5)``); repair: e.g.
    ``space.budget_repair(0.5)`` (every candidate at the MACs budget). The model is left unchanged; apply
    the winner with ``space.prune_(best.genome)``.

    >>> best = evolve_channels(space, lambda m, g: -loss(m) - space.macs_fraction(g), Evolve(budget=128))
    """
    def score(genome: torch.Tensor) -> float:
        with space.masked(genome) as m:
            return float(fitness(m, genome))

    return GeneticSearch(cfg, space.segments, seeds, repair=repair).run(score, state)
