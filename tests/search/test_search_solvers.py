"""Solvers meet the budget; DP is never worse than uniform on its objective; plans apply and round-trip."""

import copy

import pytest
import torch
from search_fixtures import calib, realised, small_space

from brainsurgeon.config import CalibOptions, dump_recipe, load_recipe
from brainsurgeon.errors import BudgetInfeasibleError, ConfigError
from brainsurgeon.search import (
    Budget,
    Plan,
    apply_plan_,
    dp_plan,
    global_magnitude_plan,
    plan_entries,
    search,
    stitch_,
    uniform_plan,
)


@pytest.mark.parametrize("budget", ["flops=0.5", "flops=0.25", "bops=0.125", "bytes=0.2", "params=0.3"])
def test_dp_meets_budget_and_beats_uniform_on_its_objective(setup, budget):
    model, table = setup
    b = Budget.parse(budget)
    dp, uni = dp_plan(table, b), uniform_plan(table, b)
    assert realised(table, dp, b.metric) <= b.fraction + 1e-12
    assert realised(table, uni, b.metric) <= b.fraction + 1e-12
    assert dp.info["score"] <= uni.info["score"] + 1e-15
    assert dp.info["cost"] == pytest.approx(realised(table, dp, b.metric), abs=1e-6)


def test_infeasible_budget_names_the_cheapest_fraction(setup):
    _, table = setup
    with pytest.raises(BudgetInfeasibleError, match=r"cheapest reachable flops is 0\.\d+ of dense"):
        dp_plan(table, Budget("flops", 0.001))
    with pytest.raises(BudgetInfeasibleError, match=r"SearchSpace\(latency=True\)"):
        dp_plan(table, Budget("latency", 0.5))


def test_global_magnitude_is_one_threshold_and_meets_budget(setup):
    model, table = setup
    plan = global_magnitude_plan(model, table, Budget("flops", 0.3))
    assert plan.info["cost"] <= 0.3 + 1e-9
    m = copy.deepcopy(model)
    apply_plan_(m, plan, calib(), CalibOptions(bn_reestimate=False))
    pruned, kept = [], []
    for n in table.layers:
        w0, w1 = getattr(model, n).weight.detach().abs(), getattr(m, n).weight.detach()
        pruned.append(w0[w1 == 0])
        kept.append(w0[w1 != 0])
    assert torch.cat(pruned).max() <= torch.cat(kept).min()  # the global threshold property


def test_plan_recipe_round_trip_and_apply(setup, tmp_path):
    model, table = setup
    plan = dp_plan(table, Budget.parse("bops=8x"))
    recipe = plan.to_recipe()
    assert [type(s.method).verb for s in recipe.steps] in (["sparsify", "quantize"], ["sparsify"], ["quantize"])
    layers = [n for n, _ in plan.layers]
    for step in recipe.steps:  # every layer is either overridden by its exact name or ignored
        named = [p for p, _ in step.overrides] + list(step.ignore)
        assert sorted(named) == sorted(layers)
    assert Plan.from_recipe(load_recipe(dump_recipe(recipe))).as_dict() == {n: c for n, c in plan.layers if c}
    plan.save(str(tmp_path / "plan.yaml"))
    back = Plan.load(str(tmp_path / "plan.yaml"))
    assert dict(back.layers) == {n: c for n, c in plan.layers if c}
    m = copy.deepcopy(model)
    report = apply_plan_(m, plan, calib())
    assert any("BatchNorm" in note for note in report.notes)
    for (n, cfgs), v in zip(plan.layers, plan.variants, strict=True):
        W = getattr(m, n).weight.detach()
        if v.startswith("sp@"):
            assert (W == 0).float().mean().item() == pytest.approx(float(v[3:]), abs=2e-3)
        if "w4" in v:
            assert max(len(torch.unique(r)) for r in W.reshape(W.shape[0], -1)) <= 17
        if not cfgs:
            assert torch.equal(W, getattr(model, n).weight)


def test_stitch_loads_database_weights_and_bad_plans_leave_model_untouched(setup):
    model, table = setup
    plan = dp_plan(table, Budget("flops", 0.4))
    m = copy.deepcopy(model)
    stitch_(m, plan, table)
    for e in plan_entries(table, plan):
        want = table.db.weight(e) if e.shard else getattr(model, e.layer).weight.detach()
        assert torch.equal(getattr(m, e.layer).weight.detach(), want)
    wrong = Plan(plan.layers[:1], plan.variants[:1], ())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match=r"missing from the plan: \['fc1', 'fc2'\]"):
        apply_plan_(m, wrong, calib())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_search_api_solvers_and_errors(setup, tmp_path):
    model, table = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    root = str(table.db.root)
    for solver in ("dp", "uniform", "global-magnitude"):
        plan = search(model, small_space(), "flops=0.5", calib(), solver=solver, db=root)
        assert plan.info["solver"] == solver and plan.info["cost"] <= 0.5 + 1e-9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="unknown solver 'greedy'"):
        search(model, small_space(), "flops=0.5", calib(), solver="greedy", db=root)
    with pytest.raises(ConfigError, match="METRIC=FRACTION"):
        search(model, small_space(), "half", calib(), db=root)


def test_search_reads_a_one_shot_calibration_iterator_once(setup):
    from brainsurgeon.search import AMC

    model, table = setup
    plan = search(model, small_space(), "flops=0.5", iter(calib()), solver="amc", db=str(table.db.root),
                  amc=AMC(episodes=3, warmup=1))
    assert plan.info["cost"] <= 0.5 + 1e-9 and plan.info["solver"] == "amc-resource"
