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


def _nbytes(x: Any) -> int:
    """Bytes of the tensors in `x` (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return sum(_nbytes(v) for v in x.values()) if isinstance(x, dict) else 0


def _replay(chain: nn.Sequential, path: str, layers: dict[str, nn.Module], xs: list[Any], solve: Solve,
            dtype: torch.dtype, limit: float, need_output: bool = False) -> list[Any] | None:
    """Sequential calibration inside a chain from its cached inputs `xs` (one per batch).

    Child by child: a child without layers just maps the cache forward; a nested chain recurses;
    any other child (a residual block, a single layer) is calibrated layer by layer over the cache
    with early-stopped forwards of that child only, then maps the cache through its compressed self.
    Every child runs O(1) times per layer it holds, so the cost is linear in depth. Returns the
    chain's outputs (None when a mapped cache would exceed `limit` bytes: the caller calibrates the
    layers not solved yet another way); after the last layer the cache is mapped only if `need_output`.
    """
    children = [(k, c) for k, c in chain._modules.items() if c is not None]
    pos = {k: i for i, (k, _) in enumerate(children)}
    at = {n: pos.get(n[len(path) + 1:].split(".")[0], -1) for n in layers}  # each layer's child position
    for idx, (key, child) in enumerate(children):
        cpath = f"{path}.{key}"
        local = {n: m for n, m in layers.items() if at[n] == idx}
        later = any(i > idx for i in at.values())
        if local and _is_chain(child) and len(local) > 1:
            out = _replay(child, cpath, local, xs, solve, dtype, limit, need_output or later)
            if out is None:
                return None
            xs = out
        else:
            if local:
                _solve_sequential(child, local, lambda xs=xs: [((x,), {}) for x in xs], solve, dtype)
            if not (later or need_output):
                return xs
            ys, size = [], 0
            for x in xs:
                ys.append(child(x))
                size += _nbytes(ys[-1])
                if size > limit:
                    return None
            xs = ys
        if not (later or need_output):
            return xs
    return xs


def _catch_inputs(model: nn.Module, target: nn.Module, batches: Batches, limit: float) -> tuple[list[Any] | None, str]:
    """The first positional input of `target` for every batch (a forward stopped there), and "" ; or None
    and why not: a batch never reaches it, it is called with keywords, or the inputs exceed `limit` bytes."""
    cache: list[Any] = []
    size = [0]

    def catcher(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) != 1 or kwargs:
            cache.append(None)
        else:
            cache.append(args[0])
            size[0] += _nbytes(args[0])
        raise _StopForward

    handle = target.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for batch in batches():
            if not _forward(model, batch)[0]:
                return None, "not reached by every batch"
            if size[0] > limit:
                return None, "memory"
    finally:
        handle.remove()
    return (None, "inputs not one positional tensor") if any(x is None for x in cache) else (cache, "")


def _solve_replay(model: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                  dtype: torch.dtype, limit: float = float("inf")) -> list[str]:
    """Sequential mode in linear time: chains (nn.Sequential parts) replay from their cached inputs.

    Units in execution order: a run of layers outside every chain is calibrated as before (a forward
    per group, stopped at the layer); a chain gets its inputs in one stopped forward per batch and
    is calibrated by :func:`_replay`. A chain called more than once per forward is not replayed.
    A chain whose cached activations would exceed `limit` bytes (``CalibOptions.replay_cache_mb``)
    falls back to stopped forwards from the model input for its layers not solved yet; returns a
    note for each such fallback.
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
    done: set[str] = set()

    def tracked(name: str, module: nn.Module, H: torch.Tensor) -> None:
        solve(name, module, H)
        done.add(name)

    notes = []
    for key, names in units:
        local = {n: layers[n] for n in names}
        xs, why = _catch_inputs(model, chains[key], batches, limit) if key is not None else (None, "")
        if xs is not None and _replay(chains[key], key, local, xs, tracked, dtype, limit) is None:
            why = "memory"
        xs = None
        rest = {n: m for n, m in local.items() if n not in done}
        if rest:  # outside every chain, inputs not cacheable or over the bound: stopped forwards from the input
            _solve_sequential(model, rest, batches, tracked, dtype)
        if why == "memory":
            notes.append(f"sequential replay of {key}: its cached activations exceed CalibOptions.replay_cache_mb "
                         f"= {limit / 2**20:g} MB, so {len(rest)} of its {len(names)} layer(s) were calibrated "
                         f"with forwards from the model input (one per layer group, O(depth)); raise "
                         f"replay_cache_mb to replay them")
        log.debug("sequential unit %s: %d layer(s)", key or "(outside chains)", len(names))
    return notes
