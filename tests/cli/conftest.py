"""CLI fixtures: a temp weights cache, and a stand-in for ``brainsurgeon.api`` (plumbing tests)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from brainsurgeon.config import Recipe, load_recipe
from brainsurgeon.report import CompressionReport, LayerRow

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "digits-obs75-obq4.yaml"


@pytest.fixture
def recipe_path() -> Path:
    """The example recipe shipped in recipes/."""
    return RECIPE


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """The session's weights cache (shared with tests/models), so digits trains only once."""
    folder = tmp_path_factory.getbasetemp() / "weights-cache"
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("BRAINSURGEON_CACHE", str(folder))
    monkeypatch.delenv("CI", raising=False)
    return folder


def _fake_verb(model: nn.Module, cfg, calib, *, ignore=(), overrides=(), options=None) -> CompressionReport:
    """Magnitude pruning / round-to-nearest as a stand-in: only the plumbing is under test."""
    next(iter(calib))  # the loader must yield batches
    report = CompressionReport()
    if cfg.verb == "prune":  # structural: the stand-in leaves shapes alone
        return report
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or any(re.fullmatch(p, name) for p in ignore):
            continue
        w = m.weight.data
        bits = 32.0
        if cfg.verb == "sparsify":
            k = int(w.numel() * cfg.target_sparsity)
            if k:
                w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0
        else:
            bits = float(cfg.bits)
        report.add_row(LayerRow(name=name, method=cfg.describe(), shape=tuple(w.shape), params=w.numel(),
                                nonzeros=int(torch.count_nonzero(w)), bits=bits, loss=0.0, rel_loss=0.01,
                                seconds=0.001))
    return report


def _fake_compress(model, recipe, calib) -> CompressionReport:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    report = CompressionReport()
    for step in recipe.steps:
        report.extend(_fake_verb(model, step.method, calib, ignore=step.ignore))
    return report


@pytest.fixture
def fake_api(monkeypatch):
    """Install a fake ``brainsurgeon.api`` module; records the calls it receives."""
    calls: list[tuple[str, str]] = []
    mod = types.ModuleType("brainsurgeon.api")

    def sparsify_(model, cfg, calib, **kw):
        calls.append(("sparsify_", cfg.describe()))
        return _fake_verb(model, cfg, calib, **kw)

    def quantize_(model, cfg, calib, **kw):
        calls.append(("quantize_", cfg.describe()))
        return _fake_verb(model, cfg, calib, **kw)

    def compress(model, recipe, calib, *, data=None, val=None):
        calls.append(("compress", " + ".join(s.method.describe() for s in recipe.steps)))
        return _fake_compress(model, recipe, calib)

    mod.sparsify_, mod.quantize_, mod.compress, mod.calls = sparsify_, quantize_, compress, calls
    monkeypatch.setitem(sys.modules, "brainsurgeon.api", mod)
    return mod
