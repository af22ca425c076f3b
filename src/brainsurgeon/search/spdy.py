"""SPDY: the DP over per-layer scores reweighted by sensitivity coefficients found by local search.

Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees" (ICML 2022), sec. 3.2-3.3:
additive per-layer scores miss how layers interact, so the DP (:mod:`.dp`) solves
``min sum_l c_l * score[l][j_l]  s.t.  sum_l cost[l][j_l] <= B`` for a coefficient vector c, and
c is searched by a shrinking-neighbourhood random search that scores each DP plan by the
*stitched* model's loss on calibration data (never on test data). Every candidate is a DP plan,
so every candidate meets the budget.

Here the search starts at c = 1 (the plain DP plan, so SPDY's calibration loss is never above
DP's) instead of SPDY's best of random starts, and `seeds` (e.g. the uniform plan) are scored
beside it: the result is the least-loss plan of all evaluated, so its calibration loss is never
above any seed's either (the uniform baseline can only be matched, never lost to, on that data;
OBC's additive per-layer scores, Frantar & Alistarh NeurIPS 2022 sec. 5, miss how 4-bit errors
compound, which this final selection on the stitched model corrects). Each step resamples k coordinates log-uniformly
in [1 / spread, spread] around 1 and keeps the candidate if it lowers the loss; k shrinks from
``max(1, round(frac * L))`` to 1, moving on after `patience` failed tries (SPDY: 10 % of the
layers, 100 tries). Plans already scored are not evaluated again.

    >>> plan = spdy_plan(table, Budget.parse("bops=8x"), stitched.error, SPDY(evals=120))
    >>> plan.info["evals"] <= 120, plan.info["score"] <= plan.info["dp_loss"]
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._log import get_logger
from ..config import Config, register_config
from ..errors import ConfigError
from .config import Budget
from .database import Entry, SearchTable
from .dp import choose_variants
from .plan import Plan
from .solvers import absolute_budget, dp_plan, plan_from_entries

log = get_logger(__name__)


@register_config
@dataclass(frozen=True)
class SPDY(Config):
    """Settings of the SPDY search (budget of stitched-model evaluations, neighbourhood schedule).

    >>> SPDY(evals=60, seed=1)
    """

    evals: int = 100  # stitched-model evaluations (the DP plan's included)
    frac: float = 0.1  # initial neighbourhood: this fraction of the layers resampled per step
    patience: int = 20  # failed tries before the neighbourhood shrinks
    spread: float = 10.0  # coefficients are resampled log-uniformly in [1 / spread, spread]
    seed: int = 0
    metric: str = "kl"  # search(): the stitched model's output damage on calib, "kl" or "mse"
    batches: int = 4  # search(): calibration batches per evaluation

    def __post_init__(self) -> None:
        if not (isinstance(self.evals, int) and self.evals >= 1):
            raise ConfigError(f"SPDY.evals: must be an integer >= 1, got {self.evals!r}")
        if not 0.0 < self.frac <= 1.0:
            raise ConfigError(f"SPDY.frac: must be in (0, 1], e.g. 0.1, got {self.frac!r}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ConfigError(f"SPDY.patience: must be an integer >= 1, got {self.patience!r}")
        if self.metric not in ("kl", "mse"):
            raise ConfigError(f"SPDY.metric: must be 'kl' or 'mse', got {self.metric!r}")
        if not (isinstance(self.batches, int) and self.batches >= 1):
            raise ConfigError(f"SPDY.batches: must be an integer >= 1, got {self.batches!r}")
        if not self.spread > 1.0:
            raise ConfigError(f"SPDY.spread: must be > 1, e.g. 10, got {self.spread!r}")


def spdy_plan(table: SearchTable, budget: Budget, error: Callable[[list[Entry]], float],
              cfg: SPDY | None = None, buckets: int = 10_000, seeds: Sequence[Plan] = ()) -> Plan:
    """The best DP plan over coefficient-weighted scores, by the stitched-model `error` (lower is better).

    error(entries): the calibration loss of the model with one entry per searched layer
    stitched in (e.g. :meth:`~.api.StitchedModel.error`). seeds: plans of this table within the
    budget (e.g. :func:`~.solvers.uniform_plan`'s), scored too; the result is the best of every
    plan evaluated. The result's info holds the calibration losses of the DP plan (``dp_loss``),
    of each seed (``seed_losses``, by solver name) and of the chosen one (``score``), and which
    it is (``picked``: "dp", "spdy" or the seed's solver).
    """
    cfg = cfg or SPDY()
    dp_plan(table, budget, buckets)  # raises BudgetInfeasibleError, naming the cheapest cost
    rows = [table.entries[n] for n in table.layers]
    costs = [[e.costs[budget.metric] for e in r] for r in rows]
    scores = [[e.score for e in r] for r in rows]
    B, L = absolute_budget(table, budget), len(rows)
    rng = np.random.default_rng(cfg.seed)
    seen: dict[tuple[int, ...], float] = {}

    def solve(c: np.ndarray) -> tuple[int, ...]:
        weighted = [[c_l * s for s in s_l] for c_l, s_l in zip(c, scores, strict=True)]
        return tuple(choose_variants(costs, weighted, B, buckets))

    def loss(pick: tuple[int, ...]) -> float:
        if pick not in seen:
            seen[pick] = float(error([r[j] for r, j in zip(rows, pick, strict=True)]))
        return seen[pick]

    c = np.ones(L)
    best = solve(c)
    best_loss = dp_loss = loss(best)
    origin = {best: "dp"}
    seed_losses = {}
    for p in seeds:
        pick = _indices(table, p, budget)
        origin.setdefault(pick, str(p.info.get("solver", "seed")))
        seed_losses[str(p.info.get("solver", "seed"))] = loss(pick)
    k, fails, tries = max(1, round(cfg.frac * L)), 0, 0
    while len(seen) < cfg.evals and k >= 1 and tries < 20 * cfg.evals:
        tries += 1
        c1 = c.copy()
        idx = rng.choice(L, size=k, replace=False)
        c1[idx] = np.exp(rng.uniform(-math.log(cfg.spread), math.log(cfg.spread), size=k))
        pick = solve(c1)
        origin.setdefault(pick, "spdy")
        if loss(pick) < best_loss:
            c, best, best_loss, fails = c1, pick, seen[pick], 0
            log.debug("spdy %s: loss %.5g (k=%d, %d evals)", budget, best_loss, k, len(seen))
            continue
        fails += 1
        if fails >= cfg.patience:
            k, fails = k - 1, 0
    final = min(seen, key=lambda p: (seen[p], p != best))  # a seed may beat every DP plan
    plan = plan_from_entries(table, [r[j] for r, j in zip(rows, final, strict=True)], budget, "spdy")
    plan.info.update(score=seen[final], dp_loss=dp_loss, seed_losses=seed_losses, picked=origin[final],
                     evals=len(seen))
    log.info("spdy %s: calibration loss %.5g (DP's %.5g, seeds %s) after %d evaluations, picked %s", budget,
             seen[final], dp_loss, seed_losses, len(seen), origin[final])
    return plan


def _indices(table: SearchTable, plan: Plan, budget: Budget) -> tuple[int, ...]:
    """`plan`'s variant index per searched layer; refuses a plan of another table or over the budget."""
    names = [n for n, _ in plan.layers]
    if names != table.layers or len(plan.variants) != len(names):
        raise ConfigError(f"spdy_plan: seed plan {plan.info.get('solver', '?')!r} does not cover this table's "
                          f"searched layers in order; pass plans made from the same table (e.g. uniform_plan)")
    pick = []
    for n, v in zip(names, plan.variants, strict=True):
        js = [j for j, e in enumerate(table.entries[n]) if e.variant == v]
        if not js:
            raise ConfigError(f"spdy_plan: seed plan variant {v!r} of layer {n!r} is not in the table")
        pick.append(js[0])
    cost = sum(table.entries[n][j].costs[budget.metric] for n, j in zip(names, pick, strict=True))
    if cost > absolute_budget(table, budget) * (1 + 1e-12):
        raise ConfigError(f"spdy_plan: seed plan {plan.info.get('solver', '?')!r} costs more than the budget "
                          f"{budget}; pass only plans within it")
    return tuple(pick)
