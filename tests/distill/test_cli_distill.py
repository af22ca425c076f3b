"""``brainsurgeon distill``: recipe -> KD fine-tuning on the digits CNN, structure kept, files written."""

import argparse
import json
from pathlib import Path

import pytest

from brainsurgeon.cli import distill as cli
from brainsurgeon.config import load_recipe
from brainsurgeon.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "digits-obs75-obq4.yaml"


def parse(*argv):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    return p.parse_args(["distill", *argv])


def test_kd_config_follows_the_recipe():
    cfg = cli.kd_config(load_recipe(str(RECIPE)), parse("--model", "digits-cnn", "--recipe", str(RECIPE)))
    assert cfg.keep_zeros and cfg.qat.bits == 4 and cfg.qat.init == "existing" and cfg.epochs == 2


def test_augmentation_flags_reach_the_config():
    cfg = cli.kd_config(load_recipe(str(RECIPE)), parse("--model", "digits-cnn", "--recipe", str(RECIPE),
                                                       "--shift", "2", "--flip"))
    assert (cfg.shift, cfg.flip) == (2, True)
    plain = cli.kd_config(load_recipe(str(RECIPE)), parse("--model", "digits-cnn", "--recipe", str(RECIPE)))
    assert (plain.shift, plain.flip) == (0, False)


def test_dry_run_prints_config(capsys):
    args = parse("--model", "digits-cnn", "--recipe", str(RECIPE), "--dry-run", "--format", "json")
    assert cli.run(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["distill"]["type"] == "KD" and d["distill"]["qat"]["bits"] == 4


def test_out_is_required():
    with pytest.raises(ConfigError, match="--out DIR is required"):
        cli.run(parse("--model", "digits-cnn", "--recipe", str(RECIPE)))


FAST = """brainsurgeon_recipe: 1
steps:
  - method: {type: Magnitude, sparsity: 0.75}
    ignore: [conv1]
  - method: {type: RTN, bits: 4}
    ignore: [conv1]
"""


def test_recipe_then_kd_keeps_sparsity_and_grid(tmp_path, tmp_path_factory, monkeypatch, capsys):
    cache = tmp_path_factory.getbasetemp() / "weights-cache"  # shared with tests/models and tests/cli
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("BRAINSURGEON_CACHE", str(cache))
    out, recipe = tmp_path / "out", tmp_path / "fast.yaml"
    recipe.write_text(FAST)
    args = parse("--model", "digits-cnn", "--recipe", str(recipe), "--epochs", "1", "--out", str(out),
                 "--calib-samples", "64")
    assert cli.run(args) == 0
    rep = json.loads((out / "report.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    assert set(hist["qat_layers"]) == {"conv2", "conv3", "fc1", "fc2"} and hist["masked_weights"] == 4
    assert hist["best_metric"] >= hist["val_start"]
    assert rep["metrics"]["accuracy"]["after"] > 0.9
    from brainsurgeon.export import load
    from brainsurgeon.models import build_model

    state = load(str(out / "model"), lambda: build_model("digits-cnn")).state_dict()  # no pickle
    for name in ("conv2", "conv3", "fc1", "fc2"):
        W = state[f"{name}.weight"].reshape(state[f"{name}.weight"].shape[0], -1)
        assert (W == 0).float().mean() >= 0.74  # the 75% pruning survived
        assert max(r.unique().numel() for r in W) <= 16  # on the 4-bit grid
    assert "KD T=4" in capsys.readouterr().out
