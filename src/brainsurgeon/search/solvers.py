"""Solvers over a :class:`SearchTable`: the DP, the uniform baseline and the global-magnitude baseline.

All return a :class:`Plan` (module name -> configs) applied by the same code.

    >>> plan = dp_plan(table, Budget("flops", 0.25))
    >>> plan.info
    {'solver': 'dp', 'budget': 'flops=0.25', 'cost': 0.2497, 'score': 0.0132}
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .._log import get_logger
from ..config import Magnitude, config_from_dict
from ..errors import BudgetInfeasibleError
from .config import Budget
from .costs import weight_bytes
from .database import Entry, SearchTable
from .dp import choose_variants
from .plan import Plan
from .solve import layer_weight


def layer_budget(table: SearchTable, budget: Budget) -> float:
    """The absolute cost left for the searched layers: fraction * dense total - skipped layers."""
    _check_metric(table, budget)
    return budget.fraction * table.dense_total(budget.metric) - table.fixed_cost(budget.metric)


def _check_metric(table: SearchTable, budget: Budget) -> None:
    e = table.entries[table.layers[0]][0]
    if budget.metric not in e.costs:
        raise BudgetInfeasibleError(f"budget metric {budget.metric!r} is not in the database (it has "
                                    f"{sorted(e.costs)}); for latency budgets build it with "
                                    f"SearchSpace(latency=True)")


def dense_cost(table: SearchTable, metric: str) -> float:
    """Dense total of `metric`; latency sums the measured dense latency of every searched layer."""
    if metric == "latency":
        return sum(table.entries[n][0].costs["latency"] for n in table.layers)
    return table.dense_total(metric)


def plan_from_entries(table: SearchTable, chosen: list[Entry], budget: Budget, solver: str) -> Plan:
    """Package one entry per searched layer as a Plan with its predicted cost fraction and score."""
    cost = sum(e.costs[budget.metric] for e in chosen) + (0.0 if budget.metric == "latency"
                                                          else table.fixed_cost(budget.metric))
    layers = tuple((e.layer, tuple(config_from_dict(d) for d in e.configs)) for e in chosen)
    info = {"solver": solver, "budget": str(budget), "cost": round(cost / dense_cost(table, budget.metric), 6),
            "score": round(sum(e.score for e in chosen), 8)}
    return Plan(layers, tuple(e.variant for e in chosen), tuple(table.skipped), info)


def absolute_budget(table: SearchTable, budget: Budget) -> float:
    """The budget in the metric's units for the searched layers (latency: of the timed searched layers)."""
    if budget.metric == "latency":  # skipped layers are not timed: the budget covers searched layers
        _check_metric(table, budget)
        return budget.fraction * dense_cost(table, "latency")
    return layer_budget(table, budget)


def dp_plan(table: SearchTable, budget: Budget, buckets: int = 10_000, limit: float | None = None) -> Plan:
    """The least-score plan within the budget (multiple-choice knapsack, :mod:`.dp`).

    >>> dp_plan(table, Budget.parse("bops=8x")).variants
    ('w8', '2:4+w4', 'sp@0.8343+...', ...)

    limit: the absolute cost allowed to the searched layers, instead of the budget's (used by
    :func:`within_measured_budget`).
    """
    B = absolute_budget(table, budget) if limit is None else limit
    rows = [table.entries[n] for n in table.layers]
    try:
        pick = choose_variants([[e.costs[budget.metric] for e in r] for r in rows],
                               [[e.score for e in r] for r in rows], B, buckets)
    except BudgetInfeasibleError as err:
        cheapest = sum(min(e.costs[budget.metric] for e in r) for r in rows)
        total = dense_cost(table, budget.metric)
        fixed = 0.0 if budget.metric == "latency" else table.fixed_cost(budget.metric)
        raise BudgetInfeasibleError(f"budget {budget} is infeasible: the cheapest reachable {budget.metric} is "
                                    f"{(cheapest + fixed) / total:.4f} of dense ({cheapest + fixed:.6g} of "
                                    f"{total:.6g}); relax the budget or widen the search space ({err})") from err
    return plan_from_entries(table, [r[j] for r, j in zip(rows, pick, strict=True)], budget, "dp")


def uniform_plan(table: SearchTable, budget: Budget, measure: Callable[[Plan], float] | None = None) -> Plan:
    """Baseline: one variant name for every searched layer (layers without it stay dense).

    Among the variant names whose uniform plan meets the budget, the one of least summed score.
    `measure` (plan -> measured cost fraction) replaces the additive estimate (channel spaces).
    """
    B = absolute_budget(table, budget)
    names = list(dict.fromkeys(e.variant for n in table.layers for e in table.entries[n]))
    cands = []
    for v in names:
        chosen = [next((e for e in table.entries[n] if e.variant == v), table.entries[n][0]) for n in table.layers]
        cands.append((sum(e.score for e in chosen), v, chosen))
    for _, _, chosen in sorted(cands, key=lambda c: c[:2]):
        if measure is None:
            if sum(e.costs[budget.metric] for e in chosen) <= B * (1 + 1e-12):
                return plan_from_entries(table, chosen, budget, "uniform")
            continue
        plan = plan_from_entries(table, chosen, budget, "uniform")
        real = measure(plan)
        if real <= budget.fraction * (1 + 1e-9):
            plan.info.update(cost=round(real, 6), cost_estimate=plan.info["cost"])
            return plan
    raise BudgetInfeasibleError(f"budget {budget}: no uniform variant meets it (the most compressed uniform "
                                f"choice is above it); relax the budget or add higher sparsity levels")


def uniform_seeds(table: SearchTable, budget: Budget) -> list[Plan]:
    """``[uniform_plan(table, budget)]`` as seeds for SPDY (so its calibration loss never ends above the
    uniform plan's), or ``[]`` with a log line when no uniform plan fits the budget."""
    try:
        return [uniform_plan(table, budget)]
    except BudgetInfeasibleError:
        get_logger(__name__).info("%s: no uniform plan fits the budget; no uniform seed", budget)
        return []


def _kept_cost(table: SearchTable, name: str, kept: int, metric: str) -> float:
    p = table.profiles[name]
    if metric == "bytes":
        return weight_bytes(p.numel, kept, p.rows, 32, "unstructured") + 4.0 * p.bias
    if metric == "params":
        return float(kept + p.bias)
    return p.dense_costs(table.act_bits)[metric] * kept / p.numel


def global_magnitude_plan(model: nn.Module, table: SearchTable, budget: Budget) -> Plan:
    """Baseline: one global |w| threshold over every searched layer, lowest so the budget holds.

    Each layer gets ``Magnitude(sparsity=s_l)`` with s_l its share of weights under the threshold.
    """
    if budget.metric == "latency":
        raise BudgetInfeasibleError("global magnitude pruning has no latency model (sparse float weights do "
                                    "not run faster here); use a flops/bops/params/bytes budget")
    B = layer_budget(table, budget)
    modules = dict(model.named_modules())
    mags = {n: layer_weight(modules[n]).abs().flatten().sort().values.cpu() for n in table.layers}
    allv = torch.cat(list(mags.values())).sort().values

    def cost(t: float) -> tuple[float, dict[str, int]]:
        kept = {n: int(m.numel() - torch.searchsorted(m, torch.tensor(t, dtype=m.dtype), right=True))
                for n, m in mags.items()}
        return sum(_kept_cost(table, n, k, budget.metric) for n, k in kept.items()), kept

    lo, hi = 0, allv.numel()  # prune the `mid` smallest weights (ties pruned together)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(float(allv[mid - 1]) if mid else -1.0)[0] <= B:
            hi = mid
        else:
            lo = mid + 1
    if lo == allv.numel():
        raise BudgetInfeasibleError(f"budget {budget}: even pruning every searched weight does not meet it "
                                    f"(the skipped layers alone cost more); relax the budget")
    c, kept = cost(float(allv[lo - 1]) if lo else -1.0)
    layers, variants = [], []
    for n in table.layers:
        s = min(1.0 - kept[n] / table.profiles[n].numel, 0.999)
        layers.append((n, (Magnitude(sparsity=round(s, 6)),) if s > 0 else ()))
        variants.append(f"mag@{s:.4f}")
    info = {"solver": "global-magnitude", "budget": str(budget),
            "cost": round((c + table.fixed_cost(budget.metric)) / table.dense_total(budget.metric), 6),
            "score": float("nan")}
    return Plan(tuple(layers), tuple(variants), tuple(table.skipped), info)


def within_measured_budget(table: SearchTable, budget: Budget, measure: Callable[[Plan], float],
                           tries: int = 12) -> Plan:
    """DP re-solved until the *measured* cost fits: for channel plans, whose costs add up only
    approximately (two adjacent pruned layers share a consumer). Each round lowers the DP's
    budget by the measured overshoot.

    >>> plan = within_measured_budget(table, Budget("flops", 0.25), channel_cost_fn(model, table, calib, b))
    """
    limit, total, real = absolute_budget(table, budget), dense_cost(table, budget.metric), math.inf
    for _ in range(tries):
        plan = dp_plan(table, budget, limit=limit)
        real = measure(plan)
        if real <= budget.fraction * (1 + 1e-9):
            plan.info.update(cost=round(real, 6), cost_estimate=plan.info["cost"])
            return plan
        limit -= 1.05 * (real - budget.fraction) * total  # ask the estimate for the overshoot less
    raise BudgetInfeasibleError(f"budget {budget}: after {tries} re-solves the measured cost of the channel plan "
                                f"is still {real:.4f} of dense; relax the budget or add higher channel ratios")
