"""Pruning history: the removed indices as JSON, replayable on a fresh instance of the same model.

    >>> save_history(g, "out/prune_history.json")          # after g.prune(...) / grp.prune()
    >>> fresh = build_model(); fresh.load_state_dict(dense_state)
    >>> replay(fresh, load_history("out/prune_history.json"), example_inputs=x)   # identical weights

Each step lists ``{module, tensor, dim, idxs}`` in the coordinates of the model at that step;
replay slices the same tensors and runs the same attribute fixers, step by step. No pickling.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from torch import nn

from .._io import atomic_open
from ..errors import FormatError, SurgeryError
from .hf import sync_hf_config
from .surgery import apply_plan, undo_plan
from .trace import run_model

FORMAT = "brainsurgeon.prune_history"
VERSION = 1


def history_dict(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document for ``steps`` (``DependencyGraph.history``)."""
    return {"format": FORMAT, "version": VERSION, "steps": steps}


def save_history(graph_or_steps: Any, path: str | os.PathLike[str]) -> None:
    """Write a graph's history (or a list of steps) to ``path`` atomically."""
    steps = graph_or_steps.history if hasattr(graph_or_steps, "history") else list(graph_or_steps)
    with atomic_open(path, "w") as f:
        json.dump(history_dict(steps), f)


def load_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a history file; returns its steps."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"pruning history {os.fspath(path)!r} cannot be read: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{os.fspath(path)!r} is not a brainsurgeon pruning history (format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise FormatError(f"{os.fspath(path)!r}: history version {doc.get('version')} is not supported "
                          f"(this brainsurgeon reads {VERSION})")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("slices"), list)
                                              for s in steps):
        raise FormatError(f"{os.fspath(path)!r}: 'steps' must be a list of {{'slices': [...]}}")
    return steps


def replay(model: nn.Module, steps: list[dict[str, Any]], example_inputs: Any = None) -> nn.Module:
    """Apply recorded steps to ``model`` in place (and run ``example_inputs`` after, if given).

    On any failure the model is restored to its state before the failing step and SurgeryError is raised.
    """
    owners: dict[int, list[tuple[str, str]]] = {}
    for mn, m in model.named_modules(remove_duplicate=False):
        for pn, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if p is not None:
                owners.setdefault(id(p), []).append((mn, pn))
    undos = []
    try:
        for i, step in enumerate(steps):
            plan = {}
            for s in step["slices"]:
                try:
                    model.get_submodule(s["module"])
                except AttributeError as e:
                    raise SurgeryError(f"history step {i}: no module {s['module']!r} in {type(model).__name__}; "
                                       f"replay needs the same architecture") from e
                plan[(s["module"], s["tensor"], int(s["dim"]))] = np.asarray(s["idxs"], dtype=np.int64)
            undos.append(apply_plan(model, plan, owners))
        sync_hf_config(model)
        if example_inputs is not None:
            run_model(model, example_inputs)
    except BaseException:
        for u in reversed(undos):
            undo_plan(u)
        raise
    return model
