"""`brainsurgeon search`: dry run lists variants; a run writes a plan that loads as a recipe."""

import argparse
import json

import pytest

from brainsurgeon.cli import search as cli_search
from brainsurgeon.config import load_recipe
from brainsurgeon.errors import ConfigError
from brainsurgeon.search import Plan


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "weights-cache"  # shared with tests/cli: digits trains once
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("BRAINSURGEON_CACHE", str(folder))


def run(argv):
    p = argparse.ArgumentParser()
    cli_search.add_parser(p.add_subparsers())
    args = p.parse_args(["search", *argv])
    return args.func(args)


def test_dry_run_lists_layers_and_variants(capsys):
    assert run(["--model", "digits-cnn", "--space", "recipes/search-quick.yaml", "--budget", "flops=0.25",
                "--dry-run", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in d["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert "2:4" not in d["layers"][0]["variants"] and "2:4+w4" in d["layers"][1]["variants"]


def test_search_writes_a_plan_recipe_within_budget(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("prune_method: Magnitude\nquant_method: RTN\nlevels: 3\nnm: []\nblock_sparsities: []\n"
                     "bits: [4]\nnm_bits: []\n")
    out = tmp_path / "plan.yaml"
    assert run(["--model", "digits-cnn", "--space", str(space), "--budget", "flops=0.5", "--db",
                str(tmp_path / "db"), "--out", str(out), "--calib-samples", "128", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["info"]["cost"] <= 0.5 and len(d["layers"]) == 5
    recipe = load_recipe(str(out))
    assert recipe.calib.bn_reestimate
    loaded = {n: [type(c).__name__ for c in cs] for n, cs in Plan.load(str(out)).as_dict().items()}
    assert loaded == {r["name"]: [c["type"] for c in r["configs"]] for r in d["layers"] if r["configs"]}
    with pytest.raises(ConfigError, match="--out PLAN.yaml is required"):
        run(["--model", "digits-cnn", "--space", str(space), "--budget", "flops=0.5"])
    with pytest.raises(ConfigError, match="not found"):
        run(["--model", "digits-cnn", "--space", "nope.yaml", "--budget", "flops=0.5", "--dry-run"])


def test_spdy_solver_from_the_command_line(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("prune_method: Magnitude\nquant_method: RTN\nlevels: 3\nnm: []\nblock_sparsities: []\n"
                     "bits: [4]\nnm_bits: []\n")
    assert run(["--model", "digits-cnn", "--space", str(space), "--budget", "flops=0.5", "--solver", "spdy",
                "--db", str(tmp_path / "db"), "--out", str(tmp_path / "plan.yaml"), "--calib-samples", "128",
                "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["info"]["cost"] <= 0.5 and d["info"]["solver"] == "spdy"
