"""Loading runs no code from the checkpoint: formats are rebuilt from brainsurgeon's own registry only."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from brainsurgeon.errors import FormatError
from brainsurgeon.export import build_module, save

LOAD = """
import sys, torch
from brainsurgeon.export import load
from brainsurgeon.models import build_model
m = load(sys.argv[1], lambda: build_model("digits-cnn")).eval()
x = torch.load(sys.argv[2], weights_only=True)
print(type(m.fc1).__name__, float((m(x) - torch.load(sys.argv[3], weights_only=True)).abs().max()))
"""


def test_fresh_process_rebuilds_a_format_from_the_manifest_alone(tmp_path):
    # `import brainsurgeon` registers every built-in format; the fresh process only gets the folder
    lowrank = pytest.importorskip("brainsurgeon.lowrank")
    from brainsurgeon.models import build_model

    model = build_model("digits-cnn", seed=0).eval()
    model.fc1 = lowrank.LowRankLinear(512, 64, rank=8)  # the manifest names brainsurgeon.lowrank.modules
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
    save(model, str(tmp_path / "ck"))
    torch.save(x, tmp_path / "x.pt")
    torch.save(y, tmp_path / "y.pt")
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "ck"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["LowRankLinear", "0.0"]


def test_only_brainsurgeon_modules_are_imported_for_a_format():
    assert "this" not in sys.modules
    with pytest.raises(FormatError, match="unknown module format 'evil'"):
        build_module({"format": "evil", "spec": {}, "module": "this"})  # importing `this` would print
    assert "this" not in sys.modules
