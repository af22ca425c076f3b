"""``brainsurgeon bench``: dense vs compressed timings with MAC ratios; clear errors for bad flags."""

import argparse
import json

import pytest

from brainsurgeon.cli import bench
from brainsurgeon.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="brainsurgeon")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def _run_json(capsys, *argv: str) -> dict:
    assert bench.run(_args(*argv, "--batch", "1", "4", "--min-time", "0.03", "--format", "json")) == 0
    return json.loads(capsys.readouterr().out)


def test_pack_keeps_macs_and_reports_both_batches(capsys):
    out = _run_json(capsys, "digits-cnn", "--pack", "int8")
    assert [(r["variant"], r["batch"]) for r in out["rows"]] == [
        ("dense", 1), ("compressed", 1), ("dense", 4), ("compressed", 4)]
    assert all(r["mac_ratio"] == 1.0 and r["median_ms"] > 0 and r["iqr_ms"] >= 0 for r in out["rows"])
    assert "packed int8" in out["compression"] and "aten._weight_int8pack_mm" in out["compression"]
    assert out["clock"] == "wall"


def test_sparsity_counts_only_the_stored_weights(capsys):
    out = _run_json(capsys, "digits-cnn", "--sparsity", "0.9", "--sparse-format", "csr")
    comp = [r for r in out["rows"] if r["variant"] == "compressed"]
    assert all(r["mac_ratio"] > 1.0 for r in comp)  # the Linear MACs shrink, the convs do not
    assert "2 Linear layers stored csr" in out["compression"]


@pytest.mark.slow  # prune_ traces and verifies the model: ~10-30 s on 2 shared cores
def test_structural_pruning_reduces_macs(capsys):
    pytest.importorskip("brainsurgeon.prune.api")
    out = _run_json(capsys, "digits-cnn", "--prune", "0.3")
    comp = [r for r in out["rows"] if r["variant"] == "compressed"]
    assert all(1.5 < r["mac_ratio"] < 2.5 for r in comp)


def test_table_states_the_ratio_against_macs(capsys):
    assert bench.run(_args("digits-cnn", "--pack", "int4", "--batch", "2", "--min-time", "0.03")) == 0
    text = capsys.readouterr().out
    assert "batch 2: measured speed-up" in text and "vs theoretical MAC ratio 1.00x" in text
    assert "kept dense (shape rules): fc2" in text  # 10 classes: out_features % 16 != 0 for the int4 kernel


@pytest.mark.parametrize("argv,match", [
    (("digits-cnn",), "pick exactly one of --pack, --prune, --sparsity"),
    (("digits-cnn", "--pack", "int8", "--prune", "0.3"), "pick exactly one"),
    (("no-such-model", "--pack", "int8"), r"unknown model 'no-such-model'.*torchvision:NAME"),
    (("torchvision:nope", "--pack", "int8"), "unknown torchvision classification model 'nope'"),
    (("digits-cnn", "--sparsity", "1.5"), r"--sparsity must be in \(0, 1\)"),
])
def test_bad_flags_are_clear_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        bench.run(_args(*argv, "--batch", "1", "--min-time", "0.01"))
