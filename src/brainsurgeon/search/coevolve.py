"""Co-evolution of two channel populations whose fitness depends on each other (Shu et al., ICCV 2019).

"Co-Evolutionary Compression for Unpaired Image Translation" (Shu, Wang, Han, Xu, Xu, Tao), sec. 3.2:
the two generators of a CycleGAN, G: A -> B and F: B -> A, each get a population of channel masks.
A mask p of G is scored against the current best mask of F (and vice versa) by

    fitness(p) = -( L_DisA(p) + alpha * L_dist(p) + gamma * L_cyc(p, F_best) ) - beta * |macs(p) / macs(G) - target|

with the discriminator-aware loss ``L_DisA = mean (D_B(G_p(a)) - D_B(G(a)))^2`` (the compressed output is
judged by the trained discriminator like the dense one's), cycle consistency through the partner's best
``L_cyc = mean |F_best(G_p(a)) - a|``, the distillation distance ``L_dist = mean |G_p(a) - G(a)|`` (what the
fine-tuning after the search minimises; our addition, see :func:`generator_fitness`), and the FLOP term as a
distance to the budget (the paper trades a parameter term against the losses; a fixed MAC budget makes methods
comparable, and penalising unused budget as well as overshoot keeps the search from trading capacity for a
smaller score). Candidates are scored after re-estimating the masked generator's BatchNorm statistics on a few
batches (adaptive BN, Li et al., "EagleEye", ECCV 2020): zeroing channels shifts the statistics, and without
this nearly every candidate looks broken before fine-tuning, so the fitness would rank broken generators. With
a budget repair (``repair_a``/``repair_b`` = ``ChannelSpace.budget_repair``) every candidate meets the MAC
budget exactly and keeps the top-L1 channels of each group, so the populations search per-group widths; seeded
with the uniform L1 genome, elitism keeps the best seed unless a better candidate appears. The populations
take turns: one generation of G against F's best, then one of F against G's new best; survivors are re-scored
every generation because their partner changed. Each population is a :class:`~.evolve.GeneticSearch`
(tournament, uniform crossover, bit-flip, elitism)::

    >>> best_g, best_f = coevolve(fit_g, fit_f, space_g.segments, space_f.segments, Evolve(budget=256))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._io import atomic_open
from .._modes import eval_mode
from ..errors import ConfigError
from .evolve import Evolve, GeneticSearch, Individual
from .evolve_channels import ChannelSpace

Repair = Callable[[torch.Tensor], torch.Tensor]
Fitness2 = Callable[[torch.Tensor, torch.Tensor], float]  # (own genome, partner's best genome) -> fitness


def coevolve(fitness_a: Fitness2, fitness_b: Fitness2, segments_a: Sequence[int], segments_b: Sequence[int],
             cfg: Evolve, *, seeds_a: Sequence[torch.Tensor] = (), seeds_b: Sequence[torch.Tensor] = (),
             repair_a: Repair | None = None, repair_b: Repair | None = None,
             final_a: Fitness2 | None = None, final_b: Fitness2 | None = None,
             state: str | os.PathLike[str] | None = None) -> tuple[Individual, Individual]:
    """Alternate generations of two GAs, each scored against the other's current best; `cfg.budget` per population.

    The partner of population A's first generation is B's first seed, repaired (or B's all-ones genome).
    repair_a / repair_b: each population's ``GeneticSearch`` repair (``ChannelSpace.budget_repair``).
    final_a / final_b: the same fitness on held-out data; the finalists (final members, best, seeds) are
    re-scored with it (``GeneticSearch.reselect``: A's against B's best, then B's against A's pick). With
    `state`, both populations and the partners are saved after every round and a rerun resumes.
    """
    cfg = dataclasses.replace(cfg, reevaluate=True)
    ga = GeneticSearch(cfg, segments_a, seeds_a, repair=repair_a)
    gb = GeneticSearch(dataclasses.replace(cfg, seed=cfg.seed + 1), segments_b, seeds_b, repair=repair_b)
    first = 1 if cfg.init_dense else 0
    best_b = gb.pop[first].clone() if seeds_b else torch.ones(sum(segments_b), dtype=torch.bool)
    best_a = torch.ones(sum(segments_a), dtype=torch.bool)
    if state is not None and os.path.exists(state):
        sd = torch.load(state, weights_only=True)
        ga.load_state_dict(sd["a"])
        gb.load_state_dict(sd["b"])
        best_a, best_b = sd["best_a"], sd["best_b"]
    while True:
        if not ga.step(lambda g, partner=best_b: fitness_a(g, partner)):
            break
        best_a = ga.best().genome
        if not gb.step(lambda g, partner=best_a: fitness_b(g, partner)):
            break
        best_b = gb.best().genome
        if state is not None:
            with atomic_open(state, "wb") as f:
                torch.save({"a": ga.state_dict(), "b": gb.state_dict(), "best_a": best_a, "best_b": best_b}, f)
    if not gb.history:
        raise ConfigError("coevolve: the budget did not allow one generation of both populations; raise budget")
    if final_a is None or final_b is None:
        return ga.best(), gb.best()
    pick_a = ga.reselect(lambda g: final_a(g, best_b))
    return pick_a, gb.reselect(lambda g: final_b(g, pick_a.genome))


class Recovery:
    """Each candidate physically pruned and distilled a few steps toward the dense generator: the first steps of
    the fine-tuning that follows the search, so that a fitness scores what the fine-tuning starts to recover.

    ``recovery(genome)`` returns the pruned copy (``ChannelSpace.pruned``) after `steps` Adam steps (lr, betas
    (0.5, 0.999), as ``models.gan.finetune_pair_``) of L1 to the dense generator's outputs on consecutive
    `batch`-sized slices of x (steps * batch images), its BatchNorm statistics then re-estimated on `calib`
    (adaptive BN), in eval mode. Results are cached per genome (`cache` entries), so a fitness re-scoring a
    survivor against a new partner, or on held-out images, trains nothing again. Why: on the MNIST CycleGAN
    (14 budget-repaired pairs, ``bench/gan_fitness_study.py``) the zero-shot fitness (adaptive BN, no
    training) has Spearman -0.36 at 1/2 of the MACs with the result after the 40-step fine-tuning (its best
    pair ends worst) and +0.78 at 1/8; after a 5 / 10-step recovery +0.69 / +0.76 and +0.95 / +0.98.

    >>> rec = Recovery(space, x_train, steps=10, calib=[x_cal])
    >>> fit = generator_fitness(space, D, x, 0.5, recovery=rec, beta=0.0)
    """

    def __init__(self, space: ChannelSpace, x: torch.Tensor, *, steps: int = 10, lr: float = 1e-3,
                 batch: int = 32, calib: Sequence[torch.Tensor] | None = None, cache: int = 512) -> None:
        if steps < 1 or batch < 1 or len(x) < steps * batch:
            raise ConfigError(f"Recovery: needs steps >= 1 and batch >= 1 with steps * batch <= len(x); got "
                              f"steps={steps}, batch={batch}, {len(x)} images; pass more images or fewer steps")
        self.space, self.steps, self.lr, self.batch, self.calib = space, steps, lr, batch, calib
        self.x = x[:steps * batch]
        with eval_mode(space.model), torch.no_grad():
            self.teacher = space.model(self.x)
        self.size, self.cache = cache, {}
        self.trained = 0  # candidates recovered (cache misses)

    def __call__(self, genome: torch.Tensor) -> nn.Module:
        key = torch.as_tensor(genome, dtype=torch.bool).numpy().tobytes()
        if key in self.cache:
            return self.cache[key]
        m = self.space.pruned(genome)
        m.train()
        opt = torch.optim.Adam(m.parameters(), lr=self.lr, betas=(0.5, 0.999))
        with torch.enable_grad():  # a fitness may call this under no_grad
            for i in range(0, self.steps * self.batch, self.batch):
                loss = (m(self.x[i:i + self.batch]) - self.teacher[i:i + self.batch]).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if self.calib is not None:
            bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.track_running_stats]
            with torch.no_grad():
                ChannelSpace._estimate(m, bns, self.calib)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if len(self.cache) >= self.size:
            self.cache.pop(next(iter(self.cache)))  # the oldest entry
        self.cache[key] = m
        self.trained += 1
        return m


def generator_fitness(space: ChannelSpace, D: nn.Module, x: torch.Tensor, target: float, *,
                      partner: ChannelSpace | None = None, alpha: float = 1.0, gamma: float = 0.1,
                      beta: float = 100.0,
                      under: float | None = None, calib: Sequence[torch.Tensor] | None = None,
                      partner_calib: Sequence[torch.Tensor] | None = None,
                      recovery: Recovery | None = None, partner_recovery: Recovery | None = None
                      ) -> Callable[[torch.Tensor, torch.Tensor | None], float]:
    """Shu et al.'s fitness of a generator mask on inputs x: ``-(L_DisA + alpha L_dist + gamma L_cyc) - MAC term``.

    L_dist = mean |G_p(x) - G(x)|, the loss the distillation fine-tuning (``models.gan.finetune_pair_``)
    starts from. Measured on the MNIST CycleGAN (12 and 11 budget-repaired candidates near uniform at
    1/4 and 1/8 of the MACs, each fine-tuned 40 steps; Spearman rank correlation of the term with the
    fine-tuned l1_G + l1_F): L_DisA 0.45 / 0.68, L_dist 0.66 / 0.66, L_cyc 0.78 / -0.03 and
    L_DisA + 10 L_cyc (the fitness without L_dist) 0.76 / 0.08; L_DisA + L_dist + 0.1 L_cyc 0.66 / 0.76.
    Hence alpha=1, gamma=0.1 by default: a cycle term that dominates ranks candidates at random at 1/8.
    That study scored l1_G + l1_F on MNIST test images; re-done on held-out training images only (12 pairs
    per budget: the repaired uniform-L1 seed and 11 repaired 5 % bit-flip mutants, terms on 32 training
    images, fine-tuned 40 steps, l1 on 128 other training A images) at 1/4 and 1/8: L_DisA 0.24 / 0.61,
    L_dist 0.91 / 0.62, L_cyc 0.78 / -0.10, L_DisA + 10 L_cyc 0.74 / 0.03, L_DisA + L_dist + L_cyc
    0.79 / 0.59, L_DisA + L_dist + 0.1 L_cyc 0.80 / 0.81 (L_DisA + L_dist 0.80 / 0.81): the defaults stand.

    D: the discriminator of the generator's output domain; partner: the other generator's space (its model
    is masked by the partner genome during the cycle term); without a partner (evolution alone) the
    cycle term is left out. The returned function takes (genome, partner_genome or None).

    MAC term: ``beta * max(0, m - target) + under * max(0, target - m)`` with m the kept MACs fraction;
    ``under`` defaults to beta (``beta |m - target|``): at a fixed budget, capacity left unused is lost
    accuracy, so a candidate well under the budget is not preferred for being small. ``under=0`` is the
    plain overshoot penalty. With a budget repair (``ChannelSpace.budget_repair``) every candidate is at
    the budget, up to one channel of rounding; pass beta=0 then, or the rounding decides the ranking.

    calib / partner_calib: batches on which the BatchNorm statistics of the masked generator / partner are
    re-estimated before it is scored (``ChannelSpace.adapted``, adaptive BN); without them the candidates
    run with the dense model's statistics. The partner's statistics are estimated once per partner genome
    (the partner's best is the same for a whole generation) and reused.

    recovery / partner_recovery: score the candidate / partner after a short distillation (:class:`Recovery`,
    pruned physically, its own BN statistics) instead of masked; calib / partner_calib are then not used for it.
    """
    G = space.model
    under = beta if under is None else under
    with eval_mode(G), torch.no_grad():
        y0 = G(x)  # the dense generator's output
        ref = D(y0)  # ... as the discriminator judges it

    partner_stats: dict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # the partner's best: adapted once

    def run(sp: ChannelSpace, genome: torch.Tensor, batches: Sequence[torch.Tensor] | None, memo=None,
            rec: Recovery | None = None):
        if rec is not None:
            return contextlib.nullcontext(rec(genome))
        return sp.adapted(genome, batches, memo) if batches is not None else sp.masked(genome)

    @torch.no_grad()
    def fit(genome: torch.Tensor, partner_genome: torch.Tensor | None = None) -> float:
        m = space.macs_fraction(genome)
        cost = beta * max(0.0, m - target) + under * max(0.0, target - m)
        with run(space, genome, calib, rec=recovery) as g:
            y = g(x)
            loss = float(((D(y) - ref) ** 2).mean())
            if alpha:
                loss += alpha * float((y - y0).abs().mean())
            if partner is not None and gamma:
                pg = partner_genome if partner_genome is not None else partner.dense_genome()
                if len(partner_stats) > 16:
                    partner_stats.clear()
                with run(partner, pg, partner_calib, partner_stats, partner_recovery) as f:
                    loss += gamma * float((f(y) - x).abs().mean())
        return -loss - cost

    return fit


def l1_at_budget(space: ChannelSpace, target: float, iters: int = 20) -> tuple[torch.Tensor, float]:
    """The uniform L1-norm genome (same kept fraction in every group) with the largest keep whose estimated
    MACs fraction is <= target, by bisection on the kept fraction; returns (genome, kept fraction)."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if space.macs_fraction(space.l1_genome(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return space.l1_genome(lo), lo
