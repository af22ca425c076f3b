"""The DP knapsack equals brute force on tiny instances, always meets the budget, and names the cheapest cost."""

import itertools
import random

import pytest

from brainsurgeon.errors import BudgetInfeasibleError
from brainsurgeon.search import choose_variants


def brute_force(costs, losses, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        c = sum(costs[i][j] for i, j in enumerate(pick))
        loss = sum(losses[i][j] for i, j in enumerate(pick))
        if c <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, pick)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_dp_matches_brute_force_on_integer_costs(seed):
    rng = random.Random(seed)
    L, J = rng.randint(1, 4), rng.randint(1, 4)
    costs = [[rng.randint(0, 10) for _ in range(J)] for _ in range(L)]
    losses = [[rng.random() for _ in range(J)] for _ in range(L)]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    pick = choose_variants(costs, losses, budget, buckets=budget or 1)  # one bucket per unit: exact
    loss = sum(losses[i][j] for i, j in enumerate(pick))
    assert sum(costs[i][j] for i, j in enumerate(pick)) <= budget
    assert loss == pytest.approx(brute_force(costs, losses, budget)[0], abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_dp_with_real_valued_costs_meets_budget_and_is_near_optimal(seed):
    rng = random.Random(100 + seed)
    costs = [[rng.uniform(0, 5) for _ in range(4)] for _ in range(4)]
    losses = [[rng.random() for _ in range(4)] for _ in range(4)]
    budget = rng.uniform(sum(min(c) for c in costs) + 0.5, sum(max(c) for c in costs))
    pick = choose_variants(costs, losses, budget, buckets=20_000)
    assert sum(costs[i][j] for i, j in enumerate(pick)) <= budget  # the true cost is checked: never over
    exact = brute_force(costs, losses, budget)[0]
    # rounding can only hide plans within L = 4 units of the budget
    relaxed = brute_force(costs, losses, budget - 4 * budget / 20_000)
    assert exact - 1e-12 <= sum(losses[i][j] for i, j in enumerate(pick)) <= relaxed[0] + 1e-12


def test_infeasible_budget_names_the_cheapest_reachable_cost():
    with pytest.raises(BudgetInfeasibleError, match=r"cheapest reachable cost is 7"):
        choose_variants([[3, 5], [4, 9]], [[0, 1], [0, 1]], budget=6)


def test_plans_exactly_at_the_budget_are_found():
    costs = [[3.0, 1 / 3], [3.0, 1 / 3], [3.0, 1 / 3]]  # 1/3 is no multiple of the unit
    pick = choose_variants(costs, [[0.0, 1.0]] * 3, budget=3.0 + 2 / 3, buckets=7)
    assert sorted(pick) == [0, 1, 1]  # one layer dense: cost exactly 3 + 2/3


def test_free_variants_and_single_choice_layers():
    assert choose_variants([[0], [0, 1]], [[1.0], [2.0, 0.0]], budget=1) == [0, 1]
