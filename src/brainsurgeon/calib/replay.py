"""Sequential calibration in linear time: ``nn.Sequential`` parts (chains) replay from cached inputs.

    >>> _solve_replay(model, layers, batches, solve, torch.float32)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .forwards import Batches, Solve, _forward, _StopForward
from .order import execution_order
from .passes import _solve_sequential

log = get_logger(__name__)


def _is_chain(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) whose forward is Sequential's: child i's output is child i+1's input."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _chains(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Sequential]:
    """The outermost chains (see :func:`_is_chain`) holding two or more of the layers, by path."""
    out: dict[str, nn.Sequential] = {}

    def visit(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            n = sum(1 for ln in layers if ln.startswith(path + "."))
            if n >= 2 and _is_chain(child):
                out[path] = child  # type: ignore[assignment]
            elif n:
                visit(path, child)

    visit("", model)
    return out


def _replay(chain: nn.Sequential, path: str, layers: dict[str, nn.Module], xs: list[Any], solve: Solve,
            dtype: torch.dtype) -> list[Any]:
    """Sequential calibration inside a chain from its cached inputs `xs` (one per batch).

    Child by child: a child without layers just maps the cache forward; a nested chain recurses;
    any other child (a residual block, a single layer) is calibrated layer by layer over the cache
    with early-stopped forwards of that child only, then maps the cache through its compressed self.
    Every child runs O(1) times per layer it holds, so the cost is linear in depth.
    """
    for idx, child in enumerate(chain):
        cpath = f"{path}.{idx}" if path else str(idx)
        local = {n: m for n, m in layers.items() if n == cpath or n.startswith(cpath + ".")}
        if local and _is_chain(child) and len(local) > 1:
            xs = _replay(child, cpath, local, xs, solve, dtype)
            continue
        if local:
            _solve_sequential(child, local, lambda xs=xs: [((x,), {}) for x in xs], solve, dtype)
        xs = [child(x) for x in xs]
    return xs


def _catch_inputs(model: nn.Module, target: nn.Module, batches: Batches) -> list[Any] | None:
    """The first positional input of `target` for every batch (a forward stopped there), or None when a
    batch never reaches it or it is called with keywords."""
    cache: list[Any] = []

    def catcher(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) != 1 or kwargs:
            cache.append(None)
        else:
            cache.append(args[0])
        raise _StopForward

    handle = target.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for batch in batches():
            if not _forward(model, batch)[0]:
                return None
    finally:
        handle.remove()
    return None if any(x is None for x in cache) else cache


def _solve_replay(model: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                  dtype: torch.dtype) -> None:
    """Sequential mode in linear time: chains (nn.Sequential parts) replay from their cached inputs.

    Units in execution order: a run of layers outside every chain is calibrated as before (a forward
    per group, stopped at the layer); a chain gets its inputs in one stopped forward per batch and
    is calibrated by :func:`_replay`. A chain called more than once per forward is not replayed.
    """
    chains = _chains(model, layers)
    groups, repeated = execution_order(model, layers, batches)
    owner = {n: next((p for p in chains if n.startswith(p + ".")), None) for n in layers}
    calls: Counter[str] = Counter()
    hooks = [c.register_forward_pre_hook(lambda m, a, p=p: calls.update([p])) for p, c in chains.items()]
    try:
        _forward(model, next(iter(batches())))
    finally:
        for h in hooks:
            h.remove()
    for p in [p for p in chains if calls[p] != 1 or any(n in repeated for n in layers if owner[n] == p)]:
        del chains[p]
    owner = {n: (o if o in chains else None) for n, o in owner.items()}
    units: list[tuple[str | None, list[str]]] = []  # (chain path or None, layers) in execution order
    for n in (n for group in groups for n in group):
        if units and units[-1][0] == owner[n]:
            units[-1][1].append(n)
        else:
            units.append((owner[n], [n]))
    for key, names in units:
        local = {n: layers[n] for n in names}
        xs = _catch_inputs(model, chains[key], batches) if key is not None else None
        if xs is None:  # outside every chain (or inputs not cacheable): stopped forwards from the model input
            _solve_sequential(model, local, batches, solve, dtype)
        else:
            _replay(chains[key], key, local, xs, solve, dtype)
        log.debug("sequential unit %s: %d layer(s)", key or "(outside chains)", len(names))
