"""Channel-ratio variants (via brainsurgeon.prune): measured costs, budget re-checked, plans physically shrink."""

import copy

import pytest
import torch
from search_fixtures import TinyNet, calib

from brainsurgeon.errors import ConfigError
from brainsurgeon.search import AMC, Plan, SearchSpace, apply_plan_, build_database, search

CHANNELS = dict(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), channel_ratios=(0.25, 0.5, 0.75),
                model_loss_batches=2)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chdb"))


def test_channel_entries_have_measured_costs(db):
    table = build_database(TinyNet(), SearchSpace(**CHANNELS), calib(), db)
    by = {e.variant: e for e in table.entries["conv1"]}
    assert list(by) == ["dense", "ch@0.2500", "ch@0.5000", "ch@0.7500"]
    assert all(not e.shard and e.structural for e in list(by.values())[1:])
    # conv1 at 50 %: 4 of 8 filters (4*4*9 MACs per position, 16 positions) and half of fc1's 128 inputs
    saved = 4 * 4 * 9 * 16 + 32 * 64
    assert by["ch@0.5000"].costs["macs"] == pytest.approx(table.profiles["conv1"].macs - saved)
    assert by["ch@0.2500"].model_loss < by["ch@0.7500"].model_loss
    fc2 = {e.variant: e for e in table.entries["fc2"]}  # model outputs: nothing can be removed
    assert fc2["ch@0.5000"].costs == fc2["dense"].costs and fc2["ch@0.5000"].model_loss == 0


@pytest.mark.parametrize("solver", ["dp", "uniform"])
def test_plans_meet_the_measured_budget_and_shrink_the_model(db, solver, tmp_path):
    model = TinyNet()
    plan = search(model, SearchSpace(**CHANNELS), "flops=0.6", calib(), solver=solver, db=db)
    assert plan.info["cost"] <= 0.6 and "cost_estimate" in plan.info
    m = copy.deepcopy(model)
    apply_plan_(m, plan, calib())
    weights = sum(mod.weight.numel() for mod in (m.conv1, m.fc1, m.fc2))
    assert weights < sum(mod.weight.numel() for mod in (model.conv1, model.fc1, model.fc2))
    assert m(torch.randn(2, 4, 4, 4)).shape == (2, 8)
    plan.save(str(tmp_path / "plan.yaml"))
    assert Plan.load(str(tmp_path / "plan.yaml")) == plan


def test_channel_spaces_refuse_mixing():
    with pytest.raises(ConfigError, match="cannot share a database with per-weight variants"):
        SearchSpace(channel_ratios=(0.5,))


@pytest.mark.parametrize("solver", ["amc-resource", "amc-accuracy"])
def test_amc_walks_a_channel_space_within_the_measured_budget(db, solver):
    model, data = TinyNet(), calib()
    seen = []

    def accuracy(m):  # reward proxy; records the measured cost of every walked model
        seen.append(measured_fraction(model, m))
        with torch.no_grad():
            return 1.0 - float((m(data[0]) - model(data[0])).pow(2).mean())

    plan = search(model, SearchSpace(**CHANNELS), "flops=0.6", data, eval_fn=accuracy, solver=solver, db=db,
                  amc=AMC(episodes=12, warmup=4))
    assert len(seen) == 12 and plan.info["solver"] == solver
    assert plan.info["cost"] <= 0.6 + 1e-9 and "cost_estimate" in plan.info
    m = copy.deepcopy(model)
    apply_plan_(m, plan, data)
    assert measured_fraction(model, m) == pytest.approx(plan.info["cost"], abs=1e-6)  # the walk measured it


def measured_fraction(dense, pruned) -> float:
    """FLOPs of `pruned` over those of `dense` (conv1, fc1, fc2; one sample)."""
    from brainsurgeon.search import profile_layers

    x = torch.zeros(1, 4, 4, 4)
    names = ["conv1", "fc1", "fc2"]
    f = [sum(p.macs for p in profile_layers(m, names, x).values()) for m in (dense, pruned)]
    return f[1] / f[0]
