"""``brainsurgeon prune``: options become a validated config; one run writes report, model and config."""

import argparse
import json

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import brainsurgeon.models as models
from brainsurgeon.cli import prune as cli
from brainsurgeon.errors import ConfigError


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="cmd"))
    return p.parse_args(["prune", *argv])


@pytest.fixture
def tiny_pretrained(monkeypatch):
    """An untrained digits CNN and small random splits instead of the cached trained one (plumbing only)."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g))

    def fake(name, *a, **k):
        return models.build_model(name, seed=0).eval(), ds, ds

    monkeypatch.setattr(models, "pretrained", fake)


def test_dry_run_prints_sizes(capsys):
    assert cli.run(parse(["--model", "digits-cnn", "--ratio", "0.5", "--dry-run", "--format", "json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 47610 and out["config"]["ratio"] == 0.5


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="ratio"):
        cli.run(parse(["--model", "digits-cnn", "--ratio", "1.5", "--dry-run"]))
    with pytest.raises(ConfigError, match="--out DIR is required"):
        cli.run(parse(["--model", "digits-cnn"]))


def test_run_writes_report_model_and_config(tmp_path, capsys, tiny_pretrained):
    out = tmp_path / "p"
    code = cli.run(parse(["--model", "digits-cnn", "--ratio", "0.5", "--importance", "obs", "--reconstruct", "obs",
                          "--round-to", "4", "--calib-samples", "64", "--out", str(out)]))
    assert code == 0
    text = capsys.readouterr().out
    assert "macs:" in text and "accuracy:" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["macs"]["after"] < rep["metrics"]["macs"]["before"]
    from brainsurgeon.export import load
    from brainsurgeon.models import build_model

    model = load(str(out / "model"), lambda: build_model("digits-cnn"))  # no pickle; pruned shapes rebuilt
    assert model.conv2.weight.shape == (16, 8, 3, 3)
    cfg = yaml.safe_load((out / "prune.yaml").read_text())
    assert cfg["type"] == "ChannelPruning" and cfg["importance"] == "obs" and cfg["round_to"] == 4
