"""Compact-design variants (``sep-KIND@p``) in the search space: measured costs, chosen by the solver,
applied through ``transform_`` (``apply_plan_``) and by stitching."""

from __future__ import annotations

import copy

import pytest
import torch
from search_fixtures import TinyNet, calib, realised, small_space
from torch.utils.flop_counter import FlopCounterMode

from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import ConfigError
from brainsurgeon.lowrank import DepthwiseSeparableConv2d, SpatialSeparableConv2d, Tucker2Conv2d
from brainsurgeon.search import Budget, SearchSpace, apply_plan_, build_database, stitch_
from brainsurgeon.search.solvers import dp_plan

KINDS = {"spatial": SpatialSeparableConv2d, "depthwise": DepthwiseSeparableConv2d, "bottleneck": Tucker2Conv2d}


def _space(**kw) -> SearchSpace:
    return small_space(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), separable_ratios=(0.5, 0.25),
                       **kw)


def _macs(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        module(x)
    return c.get_total_flops() / 2


def test_separable_entries_have_the_costs_of_the_real_module(tmp_path):
    model = TinyNet(hidden=32)
    table = build_database(model, _space(), calib(), tmp_path / "db")
    sep = [e for e in table.entries["conv1"] if e.variant.startswith("sep-")]
    assert {e.variant.split("@")[0] for e in sep} == {"sep-spatial", "sep-depthwise", "sep-bottleneck"}
    assert not any(e.variant.startswith("sep-") for n in ("fc1", "fc2") for e in table.entries[n])  # convs only
    x = calib()[0][:1]
    for e in sep:
        new = copy.deepcopy(model)
        stitch_(new, dp_plan_one(table, e), table)
        assert isinstance(new.conv1, KINDS[e.configs[0]["kind"]])
        assert sum(p.numel() for p in new.conv1.parameters()) == e.costs["params"] < model.conv1.weight.numel()
        assert _macs(new.conv1, x) == e.costs["macs"] < _macs(model.conv1, x)
        assert 0 < e.rel_loss < 1


def dp_plan_one(table, entry):
    from brainsurgeon.search.solvers import plan_from_entries

    chosen = [entry if n == entry.layer else table.entries[n][0] for n in table.layers]
    return plan_from_entries(table, chosen, Budget("flops", 1.0), "manual")


@pytest.mark.parametrize("how", ["apply", "stitch"])
def test_solver_picks_a_separable_variant_and_it_is_applied_through_transform(tmp_path, how):
    model, data = TinyNet(hidden=32), calib()
    table = build_database(model, _space(), data, tmp_path / "db")
    plan = dp_plan(table, Budget("flops", 0.8))  # fc1 + fc2 stay dense, so conv1 must shrink
    chosen = dict(zip((n for n, _ in plan.layers), plan.variants, strict=True))
    assert chosen["conv1"].startswith("sep-") and chosen["fc1"] == chosen["fc2"] == "dense"
    assert realised(table, plan, "flops") <= 0.8
    assert [type(s.method).verb for s in plan.to_recipe().steps] == ["transform"]
    entry = next(e for e in table.entries["conv1"] if e.variant == chosen["conv1"])
    m = copy.deepcopy(model)
    if how == "apply":  # compress -> transform_ with one override per layer: refitted on the same data
        apply_plan_(m, plan, data, CalibOptions(bn_reestimate=False))
    else:
        stitch_(m, plan, table)
        ref = copy.deepcopy(model)
        ref.conv1.weight.data.copy_(table.db.weight(entry))  # the database kernel the solver scored
        torch.testing.assert_close(m(data[1]), ref(data[1]), rtol=1e-4, atol=1e-4)
    assert isinstance(m.conv1, KINDS[entry.configs[0]["kind"]])
    assert sum(p.numel() for p in m.conv1.parameters()) == entry.costs["params"]
    assert _macs(m.conv1, data[0][:1]) == entry.costs["macs"]


def test_separable_space_is_validated():
    with pytest.raises(ConfigError, match="separable_ratios"):
        _space(separable_kinds=("spatial",)).__class__(separable_ratios=(1.5,))
    with pytest.raises(ConfigError, match="separable_kinds"):
        SearchSpace(separable_ratios=(0.5,), separable_kinds=("winograd",))
    with pytest.raises(ConfigError, match="channel_ratios"):
        SearchSpace(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), channel_ratios=(0.5,),
                    separable_ratios=(0.5,))
