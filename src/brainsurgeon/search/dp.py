"""The multiple-choice knapsack over the database: one variant per layer, minimal summed loss, one budget.

OBC (Frantar & Alistarh, NeurIPS 2022, sec. 5) and SPDY (Frantar & Alistarh, ICML 2022) solve
``min sum_l loss[l][j_l]  s.t.  sum_l cost[l][j_l] <= B`` by dynamic programming over costs
discretised to ``unit = B / buckets``. Costs are rounded to the nearest unit and the table
runs to ``B + L`` units (L layers: the most the rounding can shift a sum); among the table's
best plans, the least-loss one whose *true* cost fits is returned. So the result never exceeds
the budget, is exact when costs are multiples of the unit, and otherwise is at least as good
as every plan cheaper than ``B - L * unit``.

    >>> choose_variants([[0, 2], [0, 3]], [[5.0, 1.0], [4.0, 0.5]], budget=4)   # costs, losses
    [1, 0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import BudgetInfeasibleError


def choose_variants(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], budget: float,
                    buckets: int = 10_000) -> list[int]:
    """Index of the chosen variant per layer; raises BudgetInfeasibleError naming the cheapest cost.

    costs[l][j], losses[l][j]: variant j of layer l; budget: the total allowed. Negative costs
    (a structural variant whose consumers save more than it costs) are handled by offsetting each
    layer by its cheapest variant.
    """
    lows = [min(c) for c in costs]
    if min(lows) < 0:
        return choose_variants([[c - lo for c in c_l] for c_l, lo in zip(costs, lows, strict=True)], losses,
                               budget - sum(lows), buckets)
    cheapest = sum(lows)
    limit = budget * (1 + 1e-12)  # float sums of costs that add up to exactly the budget
    if cheapest > limit:
        raise BudgetInfeasibleError(f"no plan meets the budget {budget:.6g}: the cheapest reachable cost is "
                                    f"{cheapest:.6g} (every layer at its cheapest variant); relax the budget "
                                    f"or add cheaper variants (higher sparsity, fewer bits) to the search space")
    if budget <= 0:  # only free variants fit
        return [min((j for j, c in enumerate(c_l) if c <= 0), key=l_l.__getitem__)
                for c_l, l_l in zip(costs, losses, strict=True)]
    unit = budget / buckets
    size = buckets + len(costs) + 1
    dp = np.full(size, math.inf)  # dp[b]: least loss of the layers so far at discretised cost b
    dp[0] = 0.0
    picks, ints = [], []
    for c_l, l_l in zip(costs, losses, strict=True):
        c_int = [round(c / unit) for c in c_l]
        new, arg = np.full(size, math.inf), np.full(size, -1)
        for j, (c, loss) in enumerate(zip(c_int, l_l, strict=True)):
            if c >= size:
                continue
            cand = np.full(size, math.inf)
            cand[c:] = dp[: size - c] + loss  # shift by the variant's cost, add its loss
            better = cand < new
            new[better], arg[better] = cand[better], j
        dp = new
        picks.append(arg)
        ints.append(c_int)
    for b in np.argsort(dp, kind="stable"):  # best first; the first whose true cost fits
        if not math.isfinite(dp[b]):
            break
        out, bb = [], int(b)
        for arg, c_int in zip(reversed(picks), reversed(ints), strict=True):  # backtrack
            j = int(arg[bb])
            out.append(j)
            bb -= c_int[j]
        out.reverse()
        if sum(costs[i][j] for i, j in enumerate(out)) <= limit:
            return out
    raise BudgetInfeasibleError(f"no plan meets the budget {budget:.6g} at {buckets} cost buckets (the cheapest "
                                f"reachable cost is {cheapest:.6g}, within rounding); pass more buckets")
