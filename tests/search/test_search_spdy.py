"""SPDY never leaves the budget, equals DP when the true loss is additive, and never ends above DP's
calibration loss; per-entry KL scores equal a full forward, are cached, and leave the model alone."""

import copy

import pytest
import torch
from search_fixtures import TinyNet, calib, realised, small_space
from torch import nn

from brainsurgeon.errors import BudgetInfeasibleError, ConfigError
from brainsurgeon.search import (
    SPDY,
    Budget,
    OutputDamage,
    StitchedModel,
    dp_plan,
    plan_entries,
    score_table,
    search,
    spdy_plan,
)


@pytest.mark.parametrize("budget", ["flops=0.3", "bops=0.1"])
def test_spdy_meets_budget_and_is_not_above_dp_on_calibration(setup, budget):
    model, table = setup
    b = Budget.parse(budget)
    stitched = StitchedModel(model, table, calib(seed=1), metric="kl")
    plan = spdy_plan(table, b, stitched.error, SPDY(evals=25, patience=5))
    assert realised(table, plan, b.metric) <= b.fraction + 1e-12
    assert plan.info["score"] <= plan.info["dp_loss"]
    assert 1 <= plan.info["evals"] <= 25
    dp_loss = stitched.error(plan_entries(table, dp_plan(table, b)))
    assert plan.info["dp_loss"] == pytest.approx(dp_loss, rel=1e-12)
    assert plan.info["score"] == pytest.approx(stitched.error(plan_entries(table, plan)), rel=1e-12)


def test_spdy_equals_dp_when_the_true_loss_is_additive(setup):
    _, table = setup
    b = Budget.parse("flops=0.3")
    additive = lambda entries: sum(e.score for e in entries)  # noqa: E731
    plan = spdy_plan(table, b, additive, SPDY(evals=40, patience=10))
    assert plan.variants == dp_plan(table, b).variants
    assert plan.info["score"] == plan.info["dp_loss"]


def test_spdy_infeasible_and_bad_settings(setup):
    _, table = setup
    with pytest.raises(BudgetInfeasibleError, match="cheapest reachable flops"):
        spdy_plan(table, Budget("flops", 0.001), lambda e: 0.0)
    for bad in (dict(evals=0), dict(frac=0.0), dict(spread=1.0), dict(metric="ce"), dict(patience=0)):
        with pytest.raises(ConfigError, match="SPDY"):
            SPDY(**bad)


def test_search_spdy_end_to_end(tmp_path):
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = search(model, small_space(), "flops=0.3", calib(), solver="spdy", db=str(tmp_path),
                  spdy=SPDY(evals=8, patience=3))
    assert plan.info["solver"] == "spdy" and plan.info["cost"] <= 0.3 + 1e-9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Chain(nn.Module):
    """An nn.Sequential body (whose prefix the damage replays) after a stem outside it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                                  nn.Linear(8, 5))

    def forward(self, x):
        return self.body(torch.relu(self.stem(x)))


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_layer_damage_with_replay_equals_a_full_forward(metric):
    model = Chain().eval()
    xs = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    dmg = OutputDamage(model, xs, metric)
    for name in ["stem", "body.0", "body.2.0", "body.3"]:
        W = dict(model.named_modules())[name].weight.detach()
        W_hat = W + 0.1 * torch.randn_like(W)
        full = copy.deepcopy(model)
        full.get_submodule(name).weight.data.copy_(W_hat)
        assert dmg.layer_damage(name, W_hat) == pytest.approx(dmg.model_damage(full), rel=1e-12, abs=1e-15)
    assert dmg.model_damage(model) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(dmg.model.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ConfigError, match="metric"):
        OutputDamage(model, xs, "ce")


def test_score_table_is_cached_and_scales_obs_losses_per_layer(setup):
    model, table = setup
    t1 = score_table(model, table, calib(seed=2), "kl")
    t1b = score_table(model, table, calib(seed=2), "kl")
    assert t1.entries == t1b.entries and table.entries != t1.entries
    assert (table.db.root / "scores.json").is_file()
    for n in table.layers:
        dense = t1.entries[n][0]
        assert not dense.shard and dense.score == 0.0
        assert all(e.score >= 0 for e in t1.entries[n])
    t2 = score_table(model, table, calib(seed=2), "kl", per="layer")
    for n in table.layers:  # per layer: one measured entry (the largest OBS loss), the rest scaled by its ratio
        es = [e for e in t2.entries[n] if e.shard]
        ref = max(es, key=lambda e: e.loss)
        ratio = ref.score / ref.loss
        assert ref.score == pytest.approx(next(e for e in t1.entries[n] if e.key == ref.key).score, rel=1e-12)
        assert all(e.score == pytest.approx(ratio * e.loss, rel=1e-12) for e in es)
