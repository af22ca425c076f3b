"""The database: one entry per (layer, variant), resumable, re-used, model untouched, bad files refused."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from search_fixtures import TinyNet, calib, small_space

from brainsurgeon.config import config_from_dict
from brainsurgeon.errors import FormatError
from brainsurgeon.search import Database, build_database
from brainsurgeon.search.solve import solve_variant

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = build_database(model, small_space(), calib(), root)
    return model, before, table, root


def test_every_layer_gets_every_variant_with_costs_and_losses(built):
    model, before, table, root = built
    assert table.layers == ["conv1", "fc1", "fc2"]
    names = [e.variant for e in table.entries["fc1"]]
    assert names == ["dense", "sp@0.5358", "sp@0.7846", "sp@0.9000", "2:4", "2:4+w4", "block4@0.5000", "w4"]
    assert "2:4" in [e.variant for e in table.entries["conv1"]]  # 4 input channels: N:M fits
    for n in table.layers:
        dense, *rest = table.entries[n]
        assert dense.variant == "dense" and dense.loss == 0 and dense.shard == ""
        for e in rest:
            assert e.loss > 0 and e.model_loss > 0 and set(e.costs) == {"params", "bytes", "macs", "flops", "bops",
                                                                                  "bops_obc"}
            assert e.costs["bops"] < dense.costs["bops"] and e.costs["bytes"] < dense.costs["bytes"]
        sp = [e for e in rest if e.variant.startswith("sp@")]
        assert [e.loss for e in sp] == sorted(e.loss for e in sp)  # more sparsity, more loss
    assert len({e.key for es in table.entries.values() for e in es}) == 24
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_shards_hold_the_compressed_weights(built):
    _, _, table, _ = built
    by = {e.variant: e for e in table.entries["fc1"]}
    W = table.db.weight(by["sp@0.7846"])
    assert W.shape == (32, 128) and (W == 0).float().mean().item() == pytest.approx(0.7846, abs=1e-3)
    W24q = table.db.weight(by["2:4+w4"])
    assert ((W24q.reshape(32, -1, 4) != 0).sum(-1) <= 2).all()  # still 2:4 after quantization
    assert max(len(torch.unique(r)) for r in W24q) <= 16 + 1  # 4-bit grid (+ the pruned zeros)


def test_second_build_reuses_everything_and_a_new_calibration_adds_entries(built):
    model, _, table, root = built
    again = build_database(model, small_space(), calib(), root)
    assert again.computed == 0
    assert again.entries == table.entries
    other = build_database(model, small_space(), calib(seed=1), root)
    assert other.computed == 24
    assert len(Database(root).entries) == 48  # both calibration sets kept, keyed apart


def test_missing_shard_is_recomputed_and_corrupt_manifest_refused(built, tmp_path):
    model, _, table, root = built
    e = table.entries["fc2"][1]
    os.remove(root / e.shard)
    assert build_database(model, small_space(), calib(), root).computed == 1
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="delete the folder"):
        Database(tmp_path)


def test_entry_equals_a_direct_solve(built):
    model, _, table, _ = built
    from brainsurgeon.calib import capture_hessians

    with torch.no_grad(), capture_hessians(model, ["fc1"]) as hs:
        for x in calib():
            model(x)
    e = next(e for e in table.entries["fc1"] if e.variant == "2:4+w4")
    cfgs = tuple(config_from_dict(d) for d in e.configs)
    W_hat, loss, rel, _ = solve_variant(model.fc1.weight.detach(), hs["fc1"].H, cfgs, "fc1")
    assert loss == pytest.approx(e.loss, rel=1e-9) and rel == pytest.approx(e.rel_loss, rel=1e-9)
    assert torch.equal(W_hat, table.db.weight(e))


def test_process_pool_gives_the_same_entries(built, tmp_path):
    model, _, table, _ = built
    space = small_space(prune_method="SparseGPT", levels=1, nm=(), block_sparsities=(), nm_bits=(), model_loss=False)
    inline = build_database(model, space, calib(), tmp_path / "a")
    pooled = build_database(model, space, calib(), tmp_path / "b", executor="process", workers=1)
    for n in inline.layers:
        for a, b in zip(inline.entries[n], pooled.entries[n], strict=True):
            assert (a.key, a.variant, a.costs) == (b.key, b.variant, b.costs)
            assert a.loss == pytest.approx(b.loss, rel=1e-9)


RESUME_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {here!r})
from search_fixtures import TinyNet, calib, small_space
from brainsurgeon.search import build_database, database

solve = database.solve_variant
def slow_solve(*args):  # same results, slower: so the kill lands midway
    time.sleep(0.3)
    return solve(*args)
database.solve_variant = slow_solve
build_database(TinyNet(), small_space(levels=8), calib(), {root!r})
"""


def _entries(root):
    try:
        return json.loads((root / "manifest.json").read_text())["entries"]
    except (OSError, ValueError):
        return {}


def test_killed_build_resumes_without_redoing_work(tmp_path):
    root = tmp_path / "db"
    script = tmp_path / "build.py"
    script.write_text(RESUME_SCRIPT.format(here=HERE, root=str(root)))
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.time() + 120
        while len(_entries(root)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()  # SIGKILL midway: no cleanup runs
    finally:
        proc.wait()
    first = _entries(root)
    total = 3 * 13  # 3 layers x (dense, 8 levels, 2:4, 2:4+w4, block4, w4)
    assert 3 <= len(first) < total, "the build finished before it could be killed; make it slower"
    table = build_database(TinyNet(), small_space(levels=8), calib(), root)
    assert table.computed == total - len(first)  # nothing done twice
    final = _entries(root)
    assert len(final) == total
    for k, v in first.items():
        assert final[k] == v  # entries of the killed run kept as they were (same seconds: not re-solved)
    assert build_database(TinyNet(), small_space(levels=8), calib(), root).computed == 0
