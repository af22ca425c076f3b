from __future__ import annotations

import json

import pytest

from brainsurgeon.cli.main import main

LABELS = ["dense", "Magnitude 75% unstructured", "ExactOBS 75% unstructured", "RTN 4-bit", "OBQ 4-bit",
          "ExactOBS 75% unstructured + OBQ 4-bit", "ChannelPruning 50% obs local +obs-recon"]


def test_demo_plumbing_with_a_stand_in_api(tmp_path, capsys, fake_api):
    out = tmp_path / "demo"
    assert main(["demo", "--no-progress", "--out", str(out), "--calib-samples", "64"]) == 0
    table = capsys.readouterr().out
    assert [c[0] for c in fake_api.calls] == ["sparsify_", "sparsify_", "quantize_", "quantize_", "compress",
                                                "compress"]
    result = json.loads((out / "demo.json").read_text())
    rows = result["results"]
    assert [r["method"] for r in rows] == LABELS
    assert rows[0]["accuracy"] >= 0.97 and rows[0]["nonzero_fraction"] == 1.0
    assert abs(rows[1]["nonzero_fraction"] - 0.25) < 0.01 and rows[3]["avg_bits"] == 4.0
    assert all(r["delta"] == pytest.approx(r["accuracy"] - rows[0]["accuracy"]) for r in rows)
    assert set(result["reports"]) == set(LABELS[1:])
    assert all(r["name"] != "conv1" for rep in result["reports"].values() for r in rep["rows"])
    assert "kept dense (--ignore conv1): conv1 = 0.3% of the weights; --compress-all" in table
    for label in LABELS:
        assert label in table


def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("brainsurgeon.api")
    out = tmp_path / "demo"
    assert main(["demo", "--no-progress", "--out", str(out)]) == 0
    rows = json.loads((out / "demo.json").read_text())["results"]
    assert [r["method"] for r in rows] == LABELS
    dense, mag, obs, rtn, obq, joint, pruned = (r["accuracy"] for r in rows)
    assert dense >= 0.97
    assert obs >= mag - 0.01 and obq >= rtn - 0.01  # the OBS solvers are not worse than the baselines
    assert joint >= 0.9 and pruned >= 0.9
    assert abs(rows[2]["nonzero_fraction"] - 0.25) < 0.02 and rows[4]["avg_bits"] == 4.0
    # stored in the real formats, reloaded, and the artifact keeps the accuracy
    size = {r["method"]: r["bytes_on_disk"] for r in rows}
    assert size[LABELS[4]] < 0.25 * size["dense"]  # int4-packed codes + scales
    assert size[LABELS[2]] < 0.6 * size["dense"]  # bitmask + values for the sparse Linear layers
    assert size[LABELS[6]] < 0.5 * size["dense"] and rows[6]["params"] < 0.5 * rows[0]["params"]
    assert all(abs(r["accuracy_stored"] - r["accuracy"]) <= 0.01 for r in rows[1:])
    printed = capsys.readouterr().out
    assert "ExactOBS 75% unstructured + OBQ 4-bit" in printed and "report.html" in printed
    assert "<img" in (out / "report.html").read_text()


def test_demo_compress_all_and_custom_ignore(tmp_path, capsys, fake_api):
    assert main(["demo", "--no-progress", "--out", str(tmp_path), "--compress-all"]) == 0
    assert "every Conv2d and Linear layer is compressed" in capsys.readouterr().out
    rows = json.loads((tmp_path / "demo.json").read_text())["reports"]["RTN 4-bit"]["rows"]
    assert [r["name"] for r in rows] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert main(["demo", "--no-progress", "--out", str(tmp_path), "--ignore", "fc.*"]) == 0
    assert "kept dense (--ignore fc.*): fc1, fc2" in capsys.readouterr().out
