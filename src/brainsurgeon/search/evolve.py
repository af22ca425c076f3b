"""Evolutionary search over binary keep-masks: a genetic algorithm beside DP, AMC and SPDY.

A genome is a bool vector of length L split into segments (one per dependency-graph group: bit c of
segment g keeps channel c of group g). Each generation (Holland 1975; as used for channel pruning by
Shu et al., "Co-Evolutionary Compression for Unpaired Image Translation", ICCV 2019, sec. 3):

1. evaluate every new member with the user's fitness f (higher is better), within the evaluation budget;
2. keep the ``elite`` best unchanged (elitism);
3. fill the rest: two parents by tournament selection (the best of ``tournament`` random members),
   uniform crossover (each bit from either parent with probability 1/2, with probability ``crossover``;
   else a copy of the first parent), bit-flip mutation (each bit flips with probability ``mutation``);
   a segment left empty gets one random bit back (a group keeps at least one channel); an optional
   ``repair`` then maps every new genome onto the feasible set (e.g. ``ChannelSpace.budget_repair``: the
   MAC budget met exactly, channels taken in L1 order), so no evaluation is spent on an infeasible one;
   a child equal to a member of the next generation is bred again (up to 8 tries), and equal genomes are
   scored once per generation.

All randomness comes from one ``torch.Generator`` seeded by ``seed``; its state is saved with the
population after every generation (``state=path``), so a stopped run resumes to the identical result::

    >>> ga = GeneticSearch(Evolve(population=16, budget=200, seed=0), segments=[16, 32])
    >>> best = ga.run(lambda genome: -float(genome.sum()), state="evolve.pt")
    >>> best.genome, best.fitness, best.evaluations
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._io import atomic_open
from .._log import get_logger
from ..config import Config, register_config
from ..errors import ConfigError

log = get_logger(__name__)
_RETRIES = 8  # breeding attempts per child before a duplicate of a member is accepted


@register_config
@dataclass(frozen=True)
class Evolve(Config):
    """Settings of the genetic algorithm (population, budget in fitness evaluations, operators, seed).

    init_keep: the initial members keep each bit with a probability drawn uniformly from this range
    (member 0 keeps everything unless ``init_dense=False``).

    >>> Evolve(population=24, budget=400, tournament=3, mutation=0.02, elite=2, seed=1)
    """

    verb: ClassVar[str] = "search"

    population: int = 16
    budget: int = 256  # fitness evaluations, all generations together
    tournament: int = 3
    crossover: float = 0.9
    mutation: float = 0.02
    elite: int = 2
    init_keep: tuple[float, float] = (0.3, 1.0)
    init_dense: bool = True
    reevaluate: bool = False  # re-score survivors each generation (a fitness that changes: co-evolution)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.init_keep, list):  # from YAML
            object.__setattr__(self, "init_keep", tuple(self.init_keep))

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"Evolve: {msg}")

        need(isinstance(self.population, int) and self.population >= 2,
             f"population must be an integer >= 2, got {self.population!r}")
        need(isinstance(self.budget, int) and self.budget >= self.population,
             f"budget (fitness evaluations) must be >= population={self.population}, got {self.budget!r}")
        need(isinstance(self.tournament, int) and 1 <= self.tournament <= self.population,
             f"tournament must be in [1, population], got {self.tournament!r}")
        need(0.0 <= self.crossover <= 1.0, f"crossover (probability) must be in [0, 1], got {self.crossover!r}")
        need(0.0 <= self.mutation <= 0.5, f"mutation (per-bit flip probability) must be in [0, 0.5], "
                                          f"got {self.mutation!r}")
        need(isinstance(self.elite, int) and 0 <= self.elite < self.population,
             f"elite must be in [0, population), got {self.elite!r}")
        ok = isinstance(self.init_keep, (tuple, list)) and len(self.init_keep) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.init_keep)
        need(ok and 0.0 < self.init_keep[0] <= self.init_keep[1] <= 1.0,
             f"init_keep must be (lo, hi) with 0 < lo <= hi <= 1, got {self.init_keep!r}")


@dataclass
class Individual:
    """One member: its genome (bool, L) and fitness (NaN until evaluated)."""

    genome: torch.Tensor
    fitness: float = math.nan
    evaluations: int = 0  # evaluations spent by the whole search when this result was returned
    history: list[float] = field(default_factory=list)  # best fitness after each generation
    runners_up: list[torch.Tensor] = field(default_factory=list)  # reselect: the other finalists, best first


def _repair(g: torch.Tensor, bounds: list[tuple[int, int]], gen: torch.Generator) -> torch.Tensor:
    """Give every empty segment one random bit back (in place); g (L,) bool."""
    for a, b in bounds:
        if not bool(g[a:b].any()):
            g[a + int(torch.randint(b - a, (1,), generator=gen))] = True
    return g


class GeneticSearch:
    """A generational GA with tournament selection, uniform crossover, bit-flip mutation and elitism.

    segments: segment lengths (genome length L = their sum). ``step(fitness)`` runs one generation;
    ``run(fitness, state=path)`` runs until the budget is spent, saving the state after every generation.
    repair: a deterministic map genome -> genome applied to every initial member (seeds included) and child.

    >>> ga = GeneticSearch(Evolve(population=8, budget=64), segments=[4, 4])
    >>> ga.run(lambda g: float(g[:4].sum() - g[4:].sum())).genome
    tensor([ True,  True,  True,  True,  True, False, False, False])
    """

    def __init__(self, cfg: Evolve, segments: Sequence[int], seeds: Sequence[torch.Tensor] = (),
                 repair: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if not segments or any(int(n) < 1 for n in segments):
            raise ConfigError(f"GeneticSearch: segments must be positive lengths, got {list(segments)}")
        self.cfg, self.segments, self.repair = cfg, [int(n) for n in segments], repair
        ends = torch.tensor(self.segments).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends, strict=True))
        self.L = ends[-1]
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.generation, self.evaluations = 0, 0
        self.history: list[float] = []
        self.pop = self._initial(list(seeds))  # (P, L) bool
        self.fit = torch.full((cfg.population,), math.nan, dtype=torch.float64)

    def _initial(self, seeds: list[torch.Tensor]) -> torch.Tensor:
        P, (lo, hi) = self.cfg.population, self.cfg.init_keep
        keep = lo + (hi - lo) * torch.rand(P, 1, generator=self.gen, dtype=torch.float64)
        pop = torch.rand(P, self.L, generator=self.gen, dtype=torch.float64) < keep
        first = 0
        if self.cfg.init_dense:
            pop[0], first = True, 1
        for i, s in enumerate(seeds[:P - first]):
            s = torch.as_tensor(s, dtype=torch.bool).reshape(-1)
            if s.numel() != self.L:
                raise ConfigError(f"GeneticSearch: seed genome {i} has {s.numel()} bits, the genome has {self.L}")
            pop[first + i] = s
        for g in pop:
            self._fix(g)
        self.seeded = [pop[first + i].clone() for i in range(min(len(seeds), P - first))]  # after the repair
        return pop

    def _fix(self, g: torch.Tensor) -> torch.Tensor:
        """No empty segment, then the user's repair (in place; returns g)."""
        _repair(g, self.bounds, self.gen)
        if self.repair is not None:
            r = torch.as_tensor(self.repair(g.clone()), dtype=torch.bool).reshape(-1)
            if r.numel() != self.L:
                raise ConfigError(f"GeneticSearch: repair returned {r.numel()} bits for a genome of {self.L}")
            g.copy_(r)
        return g

    # ---------------------------------------------------------------- one generation
    def _tournament(self) -> int:
        idx = torch.randint(self.cfg.population, (self.cfg.tournament,), generator=self.gen)
        return int(idx[self.fit[idx].argmax()])

    def _child(self) -> torch.Tensor:
        """Two tournament winners, uniform crossover, bit-flip mutation, then the repairs."""
        a, b = self.pop[self._tournament()], self.pop[self._tournament()]
        if float(torch.rand(1, generator=self.gen)) < self.cfg.crossover:
            child = torch.where(torch.rand(self.L, generator=self.gen) < 0.5, a, b)
        else:
            child = a.clone()
        child = child ^ (torch.rand(self.L, generator=self.gen) < self.cfg.mutation)
        return self._fix(child)

    def step(self, fitness: Callable[[torch.Tensor], float]) -> bool:
        """Evaluate, then breed the next generation; False (nothing done) once the budget is spent."""
        todo = [i for i in range(self.cfg.population) if self.cfg.reevaluate or math.isnan(self.fit[i])]
        keys = {i: self.pop[i].numpy().tobytes() for i in todo}  # equal genomes are scored once per generation
        if self.evaluations + len(set(keys.values())) > self.cfg.budget:
            return False
        scored: dict[bytes, float] = {}
        for i in todo:
            if keys[i] not in scored:
                scored[keys[i]] = float(fitness(self.pop[i].clone()))
                self.evaluations += 1
            self.fit[i] = scored[keys[i]]
        self.fit = torch.nan_to_num(self.fit, nan=-math.inf)
        order = self.fit.argsort(descending=True, stable=True)
        self.history.append(float(self.fit[order[0]]))
        new_pop = self.pop[order[:self.cfg.elite]].clone()
        new_fit = self.fit[order[:self.cfg.elite]].clone()
        children: list[torch.Tensor] = []
        while len(children) < self.cfg.population - self.cfg.elite:
            for _ in range(_RETRIES):  # breed again when the child is already in the next generation
                child = self._child()
                if not any(torch.equal(child, o) for o in [*new_pop, *children]):
                    break
            children.append(child)
        if children:
            new_pop = torch.cat([new_pop, torch.stack(children)])
            new_fit = torch.cat([new_fit, torch.full((len(children),), math.nan, dtype=torch.float64)])
        self.best_genome, self.best_fitness = self.pop[order[0]].clone(), float(self.fit[order[0]])
        self.pop, self.fit = new_pop, new_fit
        self.generation += 1
        log.info("generation %d: best fitness %.6g after %d evaluations", self.generation, self.best_fitness,
                 self.evaluations)
        return True

    def best(self) -> Individual:
        """The best member evaluated so far (elitism keeps it in the population)."""
        if not self.history:
            raise ConfigError("GeneticSearch.best: no generation has run yet; call step() or run() first")
        return Individual(self.best_genome.clone(), self.best_fitness, self.evaluations, list(self.history))

    def reselect(self, fitness: Callable[[torch.Tensor], float]) -> Individual:
        """The best of the distinct final members, the best so far and the seeds under another `fitness`
        (held-out data): the GA's best is the maximum of noisy scores, so it overrates itself (the winner's
        curse); scoring the finalists once more on fresh data picks the one that generalises. These
        evaluations are not counted in the budget; the returned fitness is the held-out one, and
        ``runners_up`` holds the other finalists in held-out order (for a later, costlier selection).

        >>> best = ga.reselect(lambda g: -loss(g, x_val))
        """
        if not self.history:
            raise ConfigError("GeneticSearch.reselect: no generation has run yet; call step() or run() first")
        cands: dict[bytes, torch.Tensor] = {}
        for g in [self.best_genome, *self.pop, *self.seeded]:
            cands.setdefault(g.numpy().tobytes(), g)
        scored = [(float(fitness(g.clone())), i, g) for i, g in enumerate(cands.values())]
        ranked = sorted(scored, key=lambda t: (-t[0], t[1]))  # ties: the earlier (the GA's own best first)
        f, _, g = ranked[0]
        return Individual(g.clone(), f, self.evaluations, list(self.history), [r[2].clone() for r in ranked[1:]])

    def run(self, fitness: Callable[[torch.Tensor], float], state: str | os.PathLike[str] | None = None) -> Individual:
        """Generations until the evaluation budget is spent; with `state`, resume from and save to that file.

        >>> GeneticSearch(Evolve(budget=64), [8]).run(lambda g: float(g.sum()), state="ga.pt").fitness
        8.0
        """
        if state is not None and os.path.exists(state):
            self.load_state(state)
        while self.step(fitness):
            if state is not None:
                self.save_state(state)
        return self.best()

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (tensors and plain values only)."""
        return {"cfg": self.cfg.to_dict(), "segments": list(self.segments), "generation": self.generation,
                "evaluations": self.evaluations, "history": list(self.history), "pop": self.pop.clone(),
                "fit": self.fit.clone(), "rng": self.gen.get_state(), "best_genome": self.best_genome.clone(),
                "best_fitness": self.best_fitness}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        mine = self.cfg.to_dict()
        if sd["cfg"] != mine or list(sd["segments"]) != self.segments:
            raise ConfigError(f"GeneticSearch: the saved state was made with {sd['cfg']} over segments "
                              f"{sd['segments']}, not {mine} over {self.segments}; use another state file "
                              f"or the same settings")
        self.generation, self.evaluations = int(sd["generation"]), int(sd["evaluations"])
        self.history = [float(v) for v in sd["history"]]
        self.pop, self.fit = sd["pop"].clone(), sd["fit"].clone()
        self.gen.set_state(sd["rng"])
        self.best_genome, self.best_fitness = sd["best_genome"].clone(), float(sd["best_fitness"])

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the state atomically (``torch.save``; read back with ``weights_only=True``)."""
        with atomic_open(path, "wb") as f:
            torch.save(self.state_dict(), f)

    def load_state(self, path: str | os.PathLike[str]) -> None:
        self.load_state_dict(torch.load(path, weights_only=True))

    def split(self, genome: torch.Tensor) -> list[torch.Tensor]:
        """The genome cut into its segments."""
        return [genome[a:b] for a, b in self.bounds]
