"""AMC: every episode meets the budget (action clipping), exploration stays in [0, 1], runs are seeded."""

import numpy as np
import pytest
from search_fixtures import TinyNet, calib, small_space

from brainsurgeon.errors import ConfigError
from brainsurgeon.search import AMC, AMCSearch, Budget, build_database, search, uniform_plan
from brainsurgeon.search.amc import truncated_normal


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return build_database(TinyNet(), small_space(), calib(), tmp_path_factory.mktemp("db"))


def test_truncated_normal_stays_in_bounds_and_centres_on_mu():
    rng = np.random.default_rng(0)
    xs = [truncated_normal(0.7, 0.05, rng) for _ in range(500)]
    assert min(xs) >= 0 and max(xs) <= 1 and abs(np.mean(xs) - 0.7) < 0.01
    assert all(0 <= truncated_normal(1.5, 0.5, rng) <= 1 for _ in range(50))


@pytest.mark.parametrize("mode", ["resource", "accuracy"])
@pytest.mark.parametrize("budget", [Budget("flops", 0.3), Budget("bops", 0.1)])
def test_every_episode_meets_the_budget(table, mode, budget):
    seen = []

    def error_fn(entries):  # a cheap proxy reward: the summed database loss
        cost = sum(e.costs[budget.metric] for e in entries) / table.dense_total(budget.metric)
        seen.append(cost)
        return sum(e.score for e in entries)

    plan = AMCSearch(AMC(mode=mode, episodes=25, warmup=8, seed=1), table, budget, error_fn).run()
    assert len(seen) == 25 and max(seen) <= budget.fraction + 1e-9
    assert plan.info["cost"] <= budget.fraction + 1e-9 and plan.info["solver"] == f"amc-{mode}"


def test_amc_learns_a_plan_no_worse_than_uniform_on_a_proxy_reward(table):
    b = Budget("flops", 0.3)
    plan = AMCSearch(AMC(episodes=60, warmup=15), table, b, lambda es: sum(e.score for e in es)).run()
    assert plan.info["score"] <= uniform_plan(table, b).info["score"] + 1e-12


def test_runs_are_deterministic_given_the_seed(table):
    b = Budget("flops", 0.4)
    runs = [AMCSearch(AMC(episodes=20, warmup=5, seed=3), table, b, lambda es: sum(e.score for e in es)).run()
            for _ in range(2)]
    assert runs[0].variants == runs[1].variants


def test_search_amc_accuracy_mode_with_an_eval_fn(table):
    calls = []

    def accuracy(model):
        calls.append(1)
        return 0.9

    plan = search(TinyNet(), small_space(), "flops=0.5", calib(), eval_fn=accuracy, solver="amc-accuracy",
                  db=str(table.db.root), amc=AMC(episodes=6, warmup=3))
    assert len(calls) == 6 and plan.info["solver"] == "amc-accuracy" and plan.info["cost"] <= 0.5 + 1e-9


def test_bad_amc_settings_name_the_field():
    with pytest.raises(ConfigError, match="AMC.mode"):
        AMC(mode="greedy")
    with pytest.raises(ConfigError, match="warmup < episodes"):
        AMC(episodes=5, warmup=5)
