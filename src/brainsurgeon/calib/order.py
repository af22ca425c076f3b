"""Execution order of the layers to compress, and which of them read the same input (one Hessian).

    >>> groups, repeated = execution_order(model, {"fc1": model.fc1}, lambda: [((x,), {})])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import nn

from .forwards import Batches, _forward, _StopForward, _unreached
from .hessian import first_input


def _signature(m: nn.Module) -> tuple[Any, ...]:
    """Layers with equal signatures turn the same input tensor into the same columns."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return (type(m), m.in_channels, m.kernel_size, m.stride, m.dilation, m.groups, m.padding_mode,
                tuple(m._reversed_padding_repeated_twice))
    return ("matmul", int(m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]))


def execution_order(root: nn.Module, layers: dict[str, nn.Module],
                    batches: Batches) -> tuple[list[list[str]], set[str]]:
    """Groups of layers in execution order, and the layers called more than once per forward.

    A group is consecutive layers reading the very same input tensor object (q/k/v
    projections): one Hessian serves all of them. Raises :class:`CalibrationError` naming unreached layers.

    >>> groups, repeated = execution_order(model, {"fc1": model.fc1}, lambda: [((x,), {})])
    """
    first: dict[str, int] = {}
    same_as_prev: dict[str, bool] = {}  # first call read the tensor the previous hook call read
    calls: Counter[str] = Counter()
    state: dict[str, Any] = {"stop": False, "last": None}  # only the last input is kept alive
    repeated: set[str] = set()
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] += 1
            x = first_input(args, kwargs)
            if name not in first:
                first[name] = len(first)
                same_as_prev[name] = x is state["last"]
            state["last"] = x
            if state["stop"] and len(first) == len(layers):
                raise _StopForward
        return hook

    try:
        for name, mod in layers.items():
            handles.append(mod.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        for i, batch in enumerate(batches()):
            _forward(root, batch)  # the first batch runs fully to count repeated calls
            state["last"] = None
            if i == 0:
                repeated = {n for n, c in calls.items() if c > 1}
                state["stop"] = True
            if len(first) == len(layers):
                break
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in first]
    if missing:
        raise _unreached(missing)
    groups: list[list[str]] = []
    for name in sorted(first, key=first.__getitem__):
        prev = groups[-1][-1] if groups else None
        if (prev is not None and same_as_prev[name] and name not in repeated and prev not in repeated
                and _signature(layers[name]) == _signature(layers[prev])):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, repeated
