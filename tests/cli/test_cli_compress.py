from __future__ import annotations

import json
from pathlib import Path

from brainsurgeon.cli.main import main
from brainsurgeon.config import load_recipe
from brainsurgeon.export import load
from brainsurgeon.models import DigitsCNN


def test_recipe_file_loads_and_round_trips(recipe_path):
    from brainsurgeon.config import OBQ, ExactOBS, dump_recipe

    r = load_recipe(str(recipe_path))
    assert [s.method for s in r.steps] == [ExactOBS(sparsity=0.75), OBQ(bits=4)]
    assert [s.ignore for s in r.steps] == [("conv1",), ("conv1",)]
    assert r.calib.mode == "sequential" and r.calib.bn_reestimate is True
    assert load_recipe(dump_recipe(r)) == r


def test_dry_run_prints_the_plan_without_compressing(capsys, fake_api, recipe_path):
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1. ExactOBS 75% unstructured" in out and "2. OBQ 4-bit" in out and "fc1" in out
    assert "ignore: conv1" in out
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe_path), "--dry-run",
                 "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["method"] for s in plan["steps"]] == ["ExactOBS 75% unstructured", "OBQ 4-bit"]
    assert plan["params"] == 47_610 and len(plan["layers"]) == 5
    assert fake_api.calls == []


def test_compress_without_out_is_an_error(capsys, recipe_path):
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe_path)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


def test_compress_writes_report_model_and_recipe(tmp_path, capsys, fake_api, recipe_path):
    out = tmp_path / "c"
    argv = ["compress", "--no-progress", "--model", "digits-cnn", "--recipe", str(recipe_path),
            "--out", str(out), "--calib-samples", "64", "--format", "json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert fake_api.calls == [("compress", "ExactOBS 75% unstructured + OBQ 4-bit")]
    saved = json.loads((out / "report.json").read_text())
    assert saved == printed
    acc = saved["metrics"]["accuracy"]
    assert acc["before"] >= 0.97 and 0.0 <= acc["after"] <= 1.0
    model = load(str(out / "model"), DigitsCNN)  # safetensors + manifest, no pickle
    sparsity = (model.fc1.weight == 0).float().mean().item()
    assert abs(sparsity - 0.75) < 0.01
    assert load_recipe(str(out / "recipe.yaml")) == load_recipe(str(recipe_path))
    assert sorted(p.name for p in out.iterdir()) == ["model", "recipe.yaml", "report.html", "report.json"]
    assert sorted(p.name for p in (out / "model").iterdir()) == ["manifest.json", "model.safetensors"]
    assert "<img" in (out / "report.html").read_text()  # the per-layer plot is embedded


def test_compress_runs_a_recipe_with_a_kd_step_on_the_training_split(tmp_path, capsys):
    """prune -> KD -> GPTQ through the CLI (the real api): the KD step gets the training split as data."""
    out = tmp_path / "kd"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "digits-prune-kd-gptq4.yaml"
    argv = ["compress", "--no-progress", "--model", "digits-cnn", "--recipe", str(recipe),
            "--out", str(out), "--calib-samples", "128", "--format", "json"]
    assert main(argv) == 0
    acc = json.loads((out / "report.json").read_text())["metrics"]["accuracy"]
    assert acc["after"] > 0.9  # pruned 50 % + 4 bits, recovered by KD (no KD: ~0.77, recipes/ header)
    model = load(str(out / "model"), DigitsCNN)
    assert model.conv2.out_channels < 32  # the pruned structure is what was saved


def test_save_format_hf_only_is_refused_before_compressing(tmp_path, capsys, fake_api, recipe_path):
    argv = ["compress", "--no-progress", "--model", "digits-cnn", "--recipe", str(recipe_path),
            "--out", str(tmp_path / "c"), "--save-format", "gguf"]
    assert main(argv) == 2
    assert "not one; use --save-format brainsurgeon or onnx" in capsys.readouterr().err
    assert fake_api.calls == [] and not (tmp_path / "c").exists()
