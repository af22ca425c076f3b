"""The driver's passes over the data: one pass for every Hessian (dense), or one per layer group (sequential).

    >>> _solve_dense(model, layers, batches, solve, torch.float32)       # OBC: every H from the dense model
    >>> _solve_sequential(model, layers, batches, solve, torch.float32)  # GPTQ: each H after its predecessors
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._log import get_logger, progress
from .forwards import Batches, Solve, _forward, _StopForward, _unreached
from .hessian import HessianAccumulator, capture_layers, first_input
from .order import _signature, execution_order
from .padding import batch_index

log = get_logger(__name__)


def _solve_group(group: list[str], layers: dict[str, nn.Module], H: torch.Tensor, solve: Solve) -> None:
    for j, name in enumerate(group):
        solve(name, layers[name], H if j == len(group) - 1 else H.clone())  # solvers may damp H in place


def _capture(root: nn.Module, layers: dict[str, nn.Module], batches: Batches, dtype: torch.dtype,
             keep_outputs: bool = False) -> tuple[dict[str, HessianAccumulator], list[Any]]:
    """One pass over the batches accumulating every layer's H (and the outputs, if asked).

    A layer that reads the very tensor the layer hooked just before it read, with the same column
    layout (q/k/v, gate/up), shares that layer's accumulator: one X^T X instead of three. Sharing
    holds only if it held for every call; a layer for which it did not is accumulated on its own
    in one more pass.
    """
    accs = {n: HessianAccumulator(n, m, dtype) for n, m in layers.items()}
    sig = {n: _signature(m) for n, m in layers.items()}
    hist: dict[str, list[str | None]] = {n: [] for n in layers}  # per call: the lead it shared, or None
    state: dict[str, Any] = {"x": None, "lead": None}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, lead = first_input(args, kwargs), state["lead"]
            if lead is not None and x is state["x"] and sig[name] == sig[lead]:
                hist[name].append(lead)
                return
            accs[name].add_input(x)
            hist[name].append(None)
            state["x"], state["lead"] = x, name
        return hook

    outs, handles = [], []
    try:
        for name, mod in layers.items():  # prepend=False: pre-hooks installed earlier (act-quant) run first
            handles.append(mod.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        for i, batch in enumerate(batches()):
            with batch_index(i):  # its padding mask (token_masks)
                out = _forward(root, batch)[1]
            state["x"] = state["lead"] = None  # never share across forwards
            if keep_outputs:
                outs.append(out)
    finally:
        for h in handles:
            h.remove()
    broken = []
    for name, h in hist.items():
        leads = set(h)
        if not h or leads == {None}:
            continue
        lead = next(iter(leads))
        if len(leads) == 1 and lead is not None and set(hist[lead]) == {None} and len(hist[lead]) == len(h):
            accs[name] = accs[lead]
        else:
            broken.append(name)
    if broken:
        log.debug("layers %s read a shared input only in some calls: accumulated on their own", broken)
        with capture_layers({n: layers[n] for n in broken}, dtype) as extra:
            for i, batch in enumerate(batches()):
                with batch_index(i):
                    _forward(root, batch)
        accs.update(extra)
    return accs, outs


def _solve_dense(root: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                 dtype: torch.dtype, keep_outputs: bool = False) -> list[Any]:
    """One pass collecting every Hessian (and the dense outputs), then every solve.

    Layers sharing an accumulator get the same H tensor (so a solver may reuse its factorisation);
    if a solve changes H in place, the next one gets the original back.
    """
    accs, outs = _capture(root, layers, batches, dtype, keep_outputs)
    missing = [n for n, a in accs.items() if a.n == 0]
    if missing:
        raise _unreached(missing)
    users = Counter(id(a) for a in accs.values())
    for name in progress(list(layers), desc="layers"):
        acc = accs[name]
        H = acc.H
        users[id(acc)] -= 1
        backup = H.clone() if users[id(acc)] else None
        version = H._version
        solve(name, layers[name], H)
        if not users[id(acc)]:
            acc.reset()
        elif H._version != version:
            acc._H = backup
    return outs


def _solve_sequential(root: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                      dtype: torch.dtype) -> None:
    """Layer (group) by layer in execution order; each Hessian sees the compressed predecessors."""
    groups, repeated = execution_order(root, layers, batches)
    for group in progress(groups, desc="layers"):
        lead = group[0]
        acc = HessianAccumulator(lead, layers[lead], dtype)
        stop = lead not in repeated  # a layer reused later in the forward needs the whole forward

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 acc: HessianAccumulator = acc, stop: bool = stop) -> None:
            acc.add_input(first_input(args, kwargs))
            if stop:
                raise _StopForward

        handle = layers[lead].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for i, batch in enumerate(batches()):
                with batch_index(i):
                    _forward(root, batch)
        finally:
            handle.remove()
        log.debug("layers %s: H from %d columns", group, acc.n)
        _solve_group(group, layers, acc.H, solve)
