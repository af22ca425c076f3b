"""Joint weight + activation variants: BOP accountings exact on a toy model, the database's H from X_q,
DP plans that stitch and apply, and the costs -> variants -> factored imports one way."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from search_fixtures import TinyNet, calib
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import ConfigError
from brainsurgeon.quant.act import act_quant_layers
from brainsurgeon.search import Budget, SearchSpace, build_database, dp_plan, plan_entries, stitch_
from brainsurgeon.search.config import parse_joint
from brainsurgeon.search.costs import profile_layers, variant_costs
from brainsurgeon.search.variants import Variant, joint_variants, layer_variants

JOINT = ("8w8a", "4w4a", "2:4+8w8a", "2:4+4w4a")


def test_bops_and_bops_obc_exact_on_a_toy_linear():
    model = nn.Sequential(nn.Linear(8, 4))
    prof = profile_layers(model, ["0"], torch.zeros(1, 8))["0"]
    assert prof.macs == 32
    dense = prof.dense_costs()
    assert dense["bops"] == 32 * 32 * 32 and dense["bops_obc"] == 32 * 32
    W = torch.ones(4, 8)
    want = {"8w8a": (32 * 8 * 8, 32 * 8), "4w4a": (32 * 4 * 4, 32 * 4), "2:4+8w8a": (16 * 8 * 8, 16 * 8),
            "2:4+4w4a": (16 * 4 * 4, 16 * 4)}
    for v in joint_variants(SearchSpace(joint=JOINT), in_channels=8):
        c = variant_costs(prof, W, v)
        assert (c["bops"], c["bops_obc"]) == want[v.name]
    # OBC's accounting: 8w8a 4x, 4w4a 8x, 2:4+4w4a 16x cheaper than dense fp32
    ratios = {v.name: dense["bops_obc"] / variant_costs(prof, W, v)["bops_obc"]
              for v in joint_variants(SearchSpace(joint=JOINT), 8)}
    assert ratios == {"8w8a": 4.0, "4w4a": 8.0, "2:4+8w8a": 8.0, "2:4+4w4a": 16.0}
    w4 = variant_costs(prof, W, Variant("w4", (), bits=4), act_bits=32)  # weight-only: float activations
    assert (w4["bops"], w4["bops_obc"]) == (32 * 4 * 32, 32 * 32)


def test_joint_parse_and_variants():
    assert parse_joint("2:4+4w8a") == ("2:4", 4, 8) and parse_joint("6w8a") == ("", 6, 8)
    with pytest.raises(ConfigError, match="joint"):
        SearchSpace(joint=("8a8w",))
    with pytest.raises(ConfigError, match="bits"):
        SearchSpace(joint=("1w8a",))
    names = [v.name for v in layer_variants(SearchSpace(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(),
                                                        joint=JOINT), in_channels=3)]
    assert names == ["dense", "8w8a", "4w4a"]  # 2:4 needs in_channels % 4 == 0
    v = joint_variants(SearchSpace(joint=("2:4+4w4a",), act_observer="mse"), 8)[0]
    assert [type(c).__name__ for c in v.configs] == ["ExactOBS", "OBQ", "ActQuant"]
    assert v.configs[-1] == bs.ActQuant(bits=4, observer="mse") and (v.bits, v.act_bits, v.sparsity) == (4, 4, 0.5)


def test_search_modules_import_one_way():
    root = pathlib.Path(bs.__file__).parent / "search"

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        return {n.module.lstrip(".") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1
                and n.module}

    assert "costs" not in imports("variants") and "factored" not in imports("variants")
    assert "factored" not in imports("costs")


@pytest.fixture(scope="module")
def joint_table(tmp_path_factory):
    torch.set_num_threads(1)
    model = TinyNet()
    space = SearchSpace(prune_method="SparseGPT", quant_method="GPTQ", levels=0, nm=(), block_sparsities=(), bits=(),
                        nm_bits=(), joint=JOINT, quant_sym=False, model_loss_batches=2)
    return model, build_database(model, space, calib(), tmp_path_factory.mktemp("db"))


def test_database_joint_entries_use_the_hessian_of_quantized_inputs(joint_table):
    from brainsurgeon.calib import capture_hessians
    from brainsurgeon.obs.hessian import layer_loss
    from brainsurgeon.quant.act import insert_act_quant_

    model, table = joint_table
    e = next(e for e in table.entries["fc1"] if e.variant == "4w4a")
    qm = TinyNet()
    insert_act_quant_(qm, {n: bs.ActQuant(bits=4) for n in ("conv1", "fc1", "fc2")}, calib())
    with torch.no_grad(), capture_hessians(qm, ["fc1"]) as hs:
        for x in calib():
            qm(x)
    W, W_hat = model.fc1.weight.detach(), table.db.weight(e)
    assert e.loss == pytest.approx(layer_loss(W, W_hat, hs["fc1"].H)[0], rel=1e-6)
    assert e.costs["bops_obc"] == pytest.approx(table.profiles["fc1"].macs * 4)


def test_dp_plan_stitches_and_applies_with_activation_quantizers(joint_table):
    model, table = joint_table
    plan = dp_plan(table, Budget.parse("bops_obc=10x"))
    entries = plan_entries(table, plan)
    assert plan.info["cost"] <= 0.1 + 1e-9 and all(e.variant in JOINT for e in entries)
    with pytest.raises(ConfigError, match="calib"):
        stitch_(TinyNet(), plan, table)
    m = stitch_(TinyNet(), plan, table, calib())
    assert set(act_quant_layers(m)) == {e.layer for e in entries}
    recipe = plan.to_recipe()
    assert [type(s.method).__name__ for s in recipe.steps][-1] == "ActQuant"
    applied = TinyNet()
    bs.apply_plan_(applied, plan, calib())
    assert set(act_quant_layers(applied)) == {e.layer for e in entries}
    x = calib(1, seed=7)[0]
    assert torch.isfinite(applied(x)).all()


def test_cli_search_takes_joint_spaces_and_bops_obc_budgets(tmp_path, tmp_path_factory, capsys, monkeypatch):
    import argparse
    import json

    from brainsurgeon.cli import search as cli_search
    from brainsurgeon.config import load_recipe

    folder = tmp_path_factory.getbasetemp() / "weights-cache"  # shared with tests/cli: digits trains once
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("BRAINSURGEON_CACHE", str(folder))

    def run(argv):
        parser = argparse.ArgumentParser()
        cli_search.add_parser(parser.add_subparsers())
        args = parser.parse_args(["search", *argv])
        return args.func(args)

    assert run(["--model", "digits-cnn", "--space", "recipes/search-joint.yaml", "--budget", "bops_obc=12x",
                "--dry-run", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layers"][0]["variants"] == ["dense", "8w8a", "4w4a"]  # conv1: 1 input channel, no 2:4
    assert d["layers"][1]["variants"] == ["dense", *JOINT]
    space = tmp_path / "space.yaml"
    space.write_text("prune_method: Magnitude\nquant_method: RTN\nlevels: 0\nnm: []\nblock_sparsities: []\n"
                     "bits: []\nnm_bits: []\njoint: ['8w8a', '4w4a']\nmodel_loss: false\n")
    out = tmp_path / "plan.yaml"
    assert run(["--model", "digits-cnn", "--space", str(space), "--budget", "bops_obc=6x", "--out", str(out),
                "--calib-samples", "64", "--db", str(tmp_path / "db")]) == 0
    recipe = load_recipe(str(out))
    assert "ActQuant" in [type(s.method).__name__ for s in recipe.steps]


def test_recipe_2of4_gptq4_a8_loads_and_runs():
    from brainsurgeon.config import load_recipe

    recipe = load_recipe("recipes/2of4-gptq4-a8.yaml")
    assert [type(s.method).__name__ for s in recipe.steps] == ["SparseGPT", "GPTQ", "ActQuant"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    rep = bs.compress(model, recipe, [torch.randn(32, 16) for _ in range(2)])
    assert set(act_quant_layers(model)) == {"0", "2"}
    assert float((model[0].weight == 0).float().mean()) == 0.5
    assert any("quantized before the weight steps" in n for n in rep.notes)
    assert bs.W8A8().to_dict() == load_recipe("recipes/w8a8.yaml").to_dict()


def test_stitched_error_of_a_joint_plan_is_the_damage_of_the_stitched_model(joint_table):
    from brainsurgeon.search import OutputDamage, StitchedModel

    model, table = joint_table
    plan = dp_plan(table, Budget.parse("bops=40x"))
    scoring = calib(2, seed=5)
    stitched = StitchedModel(model, table, scoring, metric="kl", act_calib=calib())
    got = stitched.error(plan_entries(table, plan))
    ref = OutputDamage(model, scoring, "kl").model_damage(stitch_(TinyNet(), plan, table, calib()))
    assert got == pytest.approx(ref, rel=1e-9) and got > 0
    assert not act_quant_layers(stitched.model)  # the scoring copy itself is left float


@pytest.mark.parametrize("budget", ["bops=40x", "bops_obc=8x"])
def test_spdy_with_the_uniform_seed_is_never_above_uniform_on_its_scoring_data(joint_table, budget):
    from brainsurgeon.search import SPDY, StitchedModel, spdy_plan, uniform_plan

    model, table = joint_table
    b = Budget.parse(budget)
    uni = uniform_plan(table, b)
    stitched = StitchedModel(model, table, calib(2, seed=5), metric="kl", act_calib=calib())
    plan = spdy_plan(table, b, stitched.error, SPDY(evals=6, patience=2), seeds=[uni])
    uni_loss = stitched.error(plan_entries(table, uni))
    assert plan.info["seed_losses"] == {"uniform": pytest.approx(uni_loss, rel=1e-12)}
    assert plan.info["score"] <= uni_loss and plan.info["score"] <= plan.info["dp_loss"]
    assert plan.info["score"] == pytest.approx(stitched.error(plan_entries(table, plan)), rel=1e-12)
    assert plan.info["cost"] <= b.fraction + 1e-9 and 2 <= plan.info["evals"] <= 6


def test_spdy_returns_the_seed_when_it_scores_best_and_refuses_seeds_over_budget(joint_table):
    from brainsurgeon.search import SPDY, spdy_plan, uniform_plan

    _, table = joint_table
    b = Budget.parse("bops=40x")
    uni = uniform_plan(table, b)
    assert dp_plan(table, b).variants != uni.variants  # else the seed could not be told from the DP plan
    favour = lambda entries: 0.0 if tuple(e.variant for e in entries) == uni.variants else 1.0  # noqa: E731
    plan = spdy_plan(table, b, favour, SPDY(evals=5, patience=2), seeds=[uni])
    assert plan.variants == uni.variants and plan.info["picked"] == "uniform" and plan.info["score"] == 0.0
    with pytest.raises(ConfigError, match="costs more than the budget"):
        spdy_plan(table, Budget.parse("bops=80x"), favour, SPDY(evals=3), seeds=[uni])


def test_search_spdy_on_a_joint_space_seeds_uniform_and_stitches(tmp_path):
    from brainsurgeon.search import SPDY, search, uniform_plan

    model = TinyNet()
    space = SearchSpace(prune_method="SparseGPT", quant_method="GPTQ", levels=0, nm=(), block_sparsities=(), bits=(),
                        nm_bits=(), joint=JOINT, quant_sym=False, model_loss_batches=2)
    plan = search(model, space, "bops=40x", calib(), solver="spdy", db=str(tmp_path), spdy=SPDY(evals=4, patience=2))
    table = build_database(model, space, calib(), tmp_path)
    assert set(plan.info["seed_losses"]) == {"uniform"} and plan.info["score"] <= plan.info["seed_losses"]["uniform"]
    assert plan.info["cost"] <= 1 / 40 + 1e-9 and uniform_plan(table, Budget.parse("bops=40x")).info["cost"] <= 1 / 40
    assert set(act_quant_layers(stitch_(TinyNet(), plan, table, calib()))) == {"conv1", "fc1", "fc2"}
    assert not act_quant_layers(model)


def test_table_only_keeps_the_named_variants_and_uniform_then_dp_stay_in_them(joint_table):
    _, table = joint_table
    obc = table.only(JOINT)
    assert {n: [e.variant for e in es] for n, es in obc.entries.items()} == {n: list(JOINT) for n in table.layers}
    assert {n: len(es) for n, es in table.entries.items()} == {"conv1": 5, "fc1": 5, "fc2": 5}  # untouched
    b = Budget.parse("bops=8x")  # 8w8a everywhere (16x) fits, so nothing in OBC's space beats it
    assert dp_plan(obc, b).variants == ("8w8a",) * 3 and "dense" in dp_plan(table, b).variants
    with pytest.raises(ConfigError, match="have none of these variants"):
        table.only(("3w3a",))
