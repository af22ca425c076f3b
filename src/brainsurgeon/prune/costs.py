"""Measured costs of a model: parameters and MACs per module, counted on one recorded forward.

    >>> c = measure(model, example_inputs)
    >>> c.macs["conv2"], c.params["conv2"], c.total_macs
    (294912, 4608, 485184)

MACs are half the FLOPs ``torch.utils.flop_counter``'s formulas give for matmul/conv ops (one
multiply-add = 2 FLOPs), applied to the shapes of the ops in the graph's ATen trace and attributed to
the innermost module that ran the op. After pruning, the same trace with the removed sizes subtracted
gives the new counts when verification followed the trace op for op (``removed``), so no forward runs
again. Counting never fails a caller: an op whose formula raises is left out and logged, and a model
that cannot be traced gets empty MACs and a log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import flop_registry, shape_wrapper

from .._log import get_logger

log = get_logger(__name__)


@dataclass
class Costs:
    """Parameters (own, not recursive) and MACs per module name, plus totals."""

    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    total_params: int = 0
    total_macs: int = 0


def call(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs: a Tensor, a tuple of positional args or a dict of kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


_SHAPE_CODE = shape_wrapper(lambda: 0).__code__   # formulas registered on shapes (not get_raw) are wrapped so
_FORMULAS: dict[str, tuple[Any, bool] | None] = {}   # op name -> (formula, takes shapes), or None: no formula


_PACKETS: list[Any] = [-1, {}]   # [size of flop_registry when built, {overload packet: formula}]


def _formula(name: str) -> tuple[Any, bool] | None:
    """``torch.utils.flop_counter``'s formula for an op name ('aten.mm'), unwrapped to take shapes when it can."""
    if name not in _FORMULAS:
        if _PACKETS[0] != len(flop_registry):   # the registry by packet, rebuilt only when it grew
            _PACKETS[:] = [len(flop_registry), {getattr(k, "_overloadpacket", k): v for k, v in flop_registry.items()}]
        packets = _PACKETS[1]
        packet = getattr(torch.ops.aten, name.rpartition(".")[2], None) if name.startswith("aten.") else None
        fn = packets.get(packet) if packet is not None else None
        raw = getattr(fn, "__wrapped__", None)
        _FORMULAS[name] = None if fn is None else (raw, True) if raw is not None and \
            getattr(fn, "__code__", None) is _SHAPE_CODE else (fn, False)
    return _FORMULAS[name]


_FLOPS: dict[Any, int] = {}   # (op name, argument shapes and scalars, output shapes) -> FLOPs (formulas are pure)


def _frozen(v: Any) -> Any:
    """``v`` as a cache key: lists and tuples alike as tuples, every scalar typed (``1``, ``1.0`` and ``True`` are
    distinct); a sequence of plain ints (a shape, the most common argument) is one tuple tagged ``"i"``, other
    sequences are tagged ``"s"`` (so no two arguments share a key). TypeError if something is unhashable."""
    tv = type(v)
    if tv is tuple or tv is list or isinstance(v, (list, tuple)):
        if all(type(x) is int for x in v):
            return ("i", *v)
        return ("s", *(_frozen(x) for x in v))
    hash(v)
    return tv, v


def _key(name: str, args: list[Any], outs: list[Any]) -> Any:
    """The cache key of a formula call on shapes, or None (an argument that cannot be a key: not cached)."""
    try:
        return name, _frozen(args), _frozen(outs)
    except TypeError:
        return None


def trace_macs(trace: Any, removed: dict[tuple[int, int], int] | None = None) -> dict[str, int]:
    """MACs per innermost module (``""``: the root) from a recorded :class:`~brainsurgeon.graph.trace.Trace`.

    Each op that ``torch.utils.flop_counter`` has a formula for is counted from its recorded shapes,
    less ``removed[(node id, dim)]`` entries (the model after pruning, when its re-run followed the
    trace op for op); nothing runs again.
    """
    from ..graph.trace import Ref

    out: dict[str, int] = {}
    nodes = trace.nodes
    gone = removed or {}

    def shape(nid: int) -> tuple[int, ...]:
        s = nodes[nid].shape
        return tuple(n - gone.get((nid, d), 0) for d, n in enumerate(s)) if gone else s

    def meta(nid: int) -> torch.Tensor:
        return torch.empty(shape(nid), dtype=nodes[nid].dtype or torch.float32, device="meta")

    for op in trace.ops:
        got = _formula(op.name)
        if got is None:
            continue
        fn, on_shapes = got
        val = shape if on_shapes else meta
        try:
            args = [val(a.node) if isinstance(a, Ref) else [val(b.node) if isinstance(b, Ref) else b for b in a]
                    if isinstance(a, list) else a for a in op.args]
            outs = [val(o) for o in op.outputs]
            key = _key(op.name, args, outs) if on_shapes else None
            flops = _FLOPS.get(key) if key is not None else None
            if flops is None:
                res = outs[0] if len(outs) == 1 else tuple(outs)
                flops = int(fn(*args, out_shape=res) if on_shapes else fn(*args, out_val=res))
                if key is not None:
                    if len(_FLOPS) > 4096:
                        _FLOPS.clear()
                    _FLOPS[key] = flops
        except Exception as e:  # noqa: BLE001  (a formula that does not fit the recorded arguments)
            log.debug("MACs of %s in %s not counted: %s", op.name, op.module or "the root", e)
            continue
        out[op.module] = out.get(op.module, 0) + flops // 2
    return out


def measure(model: nn.Module, example_inputs: Any, trace: Any = None,
            removed: dict[tuple[int, int], int] | None = None) -> Costs:
    """Params and MACs of every module on one eval-mode forward of `example_inputs`.

    `trace`: an eval-mode trace of the model (e.g. ``DependencyGraph.traces[0]``), to count MACs without
    another forward; `removed`: the entries pruned from its tensors since, ``{(node id, dim): count}``,
    valid only when every tensor now has the traced shape minus them (see
    ``DependencyGraph.planned_shapes``). If the model cannot be traced, MACs are empty (logged), never an
    error.

    >>> measure(nn.Linear(4, 2), torch.zeros(3, 4)).total_macs
    24
    """
    out = Costs()
    seen: set[int] = set()
    for name, mod in model.named_modules():
        own = [p for p in mod._parameters.values() if p is not None]   # parameters(recurse=False), no walk
        n = sum(p.numel() for p in own)
        if n:
            out.params[name] = n
        out.total_params += sum(p.numel() for p in own if id(p) not in seen)   # shared (tied) ones once
        seen.update(id(p) for p in own)
    if trace is None:
        from ..graph.trace import trace_model
        try:
            inputs = dict(example_inputs) if isinstance(example_inputs, Mapping) else example_inputs
            trace = trace_model(model, inputs, "eval")
        except Exception as e:  # noqa: BLE001  (costs are a report, never a reason to fail)
            log.warning("MACs not counted: tracing %s failed: %s: %s", type(model).__name__, type(e).__name__, e)
            return out
    out.macs = {k: v for k, v in trace_macs(trace, removed).items() if v}
    out.total_macs = sum(out.macs.values())
    return out
