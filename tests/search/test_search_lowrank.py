"""Low-rank variants in the search database: ranks, measured costs, and plans that apply them."""

from __future__ import annotations

import copy

import pytest
import torch
from search_fixtures import TinyNet, calib, small_space
from torch.utils.flop_counter import FlopCounterMode

from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import ConfigError
from brainsurgeon.lowrank import LowRankConv2d, LowRankLinear
from brainsurgeon.search import Budget, SearchSpace, apply_plan_, build_database, stitch_
from brainsurgeon.search.factored import rank_for
from brainsurgeon.search.solvers import plan_from_entries

RATIOS = (0.25, 0.5)


def _space() -> SearchSpace:
    return small_space(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), lowrank_ratios=RATIOS)


def _macs(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        module(x)
    return c.get_total_flops() / 2


def test_lowrank_entries_have_the_rank_and_costs_of_the_factorized_module(tmp_path):
    model = TinyNet(hidden=32)
    table = build_database(model, _space(), calib(), tmp_path / "db")
    for name in table.layers:  # conv1 (8 x 36), fc1 (32 x 128), fc2 (8 x 32)
        p = table.profiles[name]
        lr = [e for e in table.entries[name] if e.variant.startswith("lr@")]
        want = sorted({rank_for(r, p.rows, p.cols) for r in RATIOS} - {0})
        want = [r for r in want if r < min(p.rows, p.cols)]
        assert [e.configs[0]["rank"] for e in lr] == want
        for e in lr:
            r = e.configs[0]["rank"]
            assert e.costs["params"] == r * (p.rows + p.cols) + p.bias  # factors + bias, float32
            assert e.costs["bytes"] == 4 * e.costs["params"]
            assert e.costs["params"] <= max(RATIOS) * p.numel + p.bias
            assert e.costs["bops"] == e.costs["macs"] * 32 * 32
            assert 0 < e.rel_loss < 1 and e.model_loss > 0
        losses = [e.rel_loss for e in lr]
        assert losses == sorted(losses, reverse=True)  # a higher rank loses less


@pytest.mark.parametrize("how", ["apply", "stitch"])
def test_plan_choosing_ranks_applies_factorized_modules_with_the_predicted_cost(tmp_path, how):
    model, data = TinyNet(hidden=32), calib()
    table = build_database(model, _space(), data, tmp_path / "db")
    chosen = [table.entries["conv1"][0]]  # conv1 dense; fc1 and fc2 at their smallest rank
    chosen += [next(e for e in table.entries[n] if e.variant.startswith("lr@")) for n in ("fc1", "fc2")]
    plan = plan_from_entries(table, chosen, Budget("params", 1.0), "manual")
    m = copy.deepcopy(model)
    if how == "apply":
        apply_plan_(m, plan, data, CalibOptions(bn_reestimate=False))
    else:
        stitch_(m, plan, table)
    x = data[0][:1]
    h = torch.relu(m.bn1(m.conv1(x))).flatten(1)
    for name, inp in (("fc1", h), ("fc2", torch.relu(m.fc1(h)))):
        e = next(e for e in chosen if e.layer == name)
        mod = getattr(m, name)
        assert isinstance(mod, LowRankLinear) and mod.rank == e.configs[0]["rank"]
        assert sum(p.numel() for p in mod.parameters()) == e.costs["params"]
        assert _macs(mod, inp) == e.costs["macs"]
    assert type(m.conv1) is torch.nn.Conv2d
    if how == "stitch":  # the stitched factors compute the database weight exactly
        ref = copy.deepcopy(model)
        for e in chosen[1:]:
            getattr(ref, e.layer).weight.data.copy_(table.db.weight(e))
        torch.testing.assert_close(m(data[1]), ref(data[1]), rtol=1e-4, atol=1e-4)


def test_conv_lowrank_plan_gives_lowrankconv2d(tmp_path):
    model, data = TinyNet(hidden=32), calib()
    table = build_database(model, _space(), data, tmp_path / "db")
    e = next(e for e in table.entries["conv1"] if e.variant.startswith("lr@"))
    plan = plan_from_entries(table, [e, table.entries["fc1"][0], table.entries["fc2"][0]], Budget("params", 1.0), "m")
    m = copy.deepcopy(model)
    apply_plan_(m, plan, data, CalibOptions(bn_reestimate=False))
    assert isinstance(m.conv1, LowRankConv2d) and m.conv1.rank == e.configs[0]["rank"]
    assert sum(p.numel() for p in m.conv1.parameters()) == e.costs["params"]
    assert _macs(m.conv1, data[0][:1]) == e.costs["macs"]


def test_lowrank_ratio_must_be_a_fraction():
    with pytest.raises(ConfigError, match="lowrank_ratios"):
        SearchSpace(lowrank_ratios=(1.5,))


def test_the_lowrank_recipe_space_loads():
    from brainsurgeon.search import load_space

    space = load_space("recipes/search-lowrank.yaml")
    assert space.lowrank_ratios == (0.125, 0.25, 0.5) and "low-rank" in space.describe()
