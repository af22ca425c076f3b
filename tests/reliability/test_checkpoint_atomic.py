"""Bug 13.#2: replacing a checkpoint is atomic, crashed saves leave nothing behind, user files survive."""

import os
import random
import signal
import subprocess
import sys
import time

import ckpt_child
import torch

from brainsurgeon.export import load, save
from brainsurgeon.export.folder import _siblings

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(mode: str, path: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(HERE, "..", "..", "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "ckpt_child.py"), mode, path],
                            stdout=subprocess.PIPE, text=True, env=env)


def _loads(path: str) -> bool:
    m = load(path, ckpt_child.build)
    return isinstance(m, torch.nn.Sequential) and m[0].weight.shape == (512, 512)


def test_save_keeps_the_users_other_files(tmp_path):
    ck = str(tmp_path / "ck")
    save(ckpt_child.build(), ck)
    (tmp_path / "ck" / "notes.txt").write_text("keep me")
    (tmp_path / "ck" / "extra").mkdir()
    (tmp_path / "ck" / "extra" / "a.txt").write_text("me too")
    save(ckpt_child.build(1), ck)
    assert (tmp_path / "ck" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "ck" / "extra" / "a.txt").read_text() == "me too"
    assert torch.equal(load(ck, ckpt_child.build)[0].weight, ckpt_child.build(1)[0].weight)
    assert _siblings(ck) == []


def test_crash_between_the_two_renames_is_recovered_and_cleaned(tmp_path):
    ck = str(tmp_path / "ck")
    save(ckpt_child.build(0), ck)
    child = _child("crash", ck)
    assert child.wait(timeout=120) == 9
    assert not os.path.exists(ck) and sorted(k for _, k, _ in _siblings(ck)) == ["old", "tmp"]
    again = load(ck, ckpt_child.build)  # recovered from the .old-* sibling: the previous checkpoint
    assert torch.equal(again[0].weight, ckpt_child.build(0)[0].weight)
    save(ckpt_child.build(2), ck)
    assert _siblings(ck) == [] and torch.equal(load(ck, ckpt_child.build)[0].weight, ckpt_child.build(2)[0].weight)


def test_kill_9_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    ck = str(tmp_path / "ck")
    rng = random.Random(0)
    for _ in range(3):
        child = _child("loop", ck)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert _loads(ck)
    save(ckpt_child.build(3), ck)  # the next save removes every temp folder the kills left
    assert _siblings(ck) == [] and sorted(os.listdir(tmp_path)) == ["ck"]
    assert _loads(ck)
