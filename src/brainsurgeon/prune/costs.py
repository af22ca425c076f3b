"""Measured costs of a model: parameters and MACs per module, counted on one recorded forward.

    >>> c = measure(model, example_inputs)
    >>> c.macs["conv2"], c.params["conv2"], c.total_macs
    (294912, 4608, 485184)

MACs are half the FLOPs ``torch.utils.flop_counter``'s formulas give for matmul/conv ops (one
multiply-add = 2 FLOPs), applied to the shapes of the ops in the graph's ATen trace and attributed to
the innermost module that ran the op. Counting never fails a caller: an op whose formula raises is
left out and logged, and a model that cannot be traced gets empty MACs and a log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import flop_registry

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


def _meta(shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or torch.float32, device="meta")


def trace_macs(trace: Any) -> dict[str, int]:
    """MACs per innermost module (``""``: the root) from a recorded :class:`~brainsurgeon.graph.trace.Trace`.

    Each op that ``torch.utils.flop_counter`` has a formula for is counted from its recorded shapes;
    nothing runs again.
    """
    from ..graph.trace import Ref

    out: dict[str, int] = {}
    formulas = {getattr(k, "_overloadpacket", k): v for k, v in flop_registry.items()}
    for op in trace.ops:
        packet = getattr(torch.ops.aten, op.name.rpartition(".")[2], None)
        fn = formulas.get(packet) if packet is not None else None
        if fn is None:
            continue
        try:
            node = trace.nodes
            args = [_meta(node[a.node].shape, node[a.node].dtype) if isinstance(a, Ref) else
                    [_meta(node[b.node].shape, node[b.node].dtype) if isinstance(b, Ref) else b for b in a]
                    if isinstance(a, list) else a for a in op.args]
            outs = [_meta(node[o].shape, node[o].dtype) for o in op.outputs]
            flops = fn(*args, out_val=outs[0] if len(outs) == 1 else tuple(outs))
        except Exception as e:  # noqa: BLE001  (a formula that does not fit the recorded arguments)
            log.debug("MACs of %s in %s not counted: %s", op.name, op.module or "the root", e)
            continue
        out[op.module] = out.get(op.module, 0) + int(flops) // 2
    return out


def measure(model: nn.Module, example_inputs: Any, trace: Any = None) -> Costs:
    """Params and MACs of every module on one eval-mode forward of `example_inputs`.

    `trace`: an eval-mode trace of the model as it is now (e.g. ``DependencyGraph.traces[0]``), to count
    MACs without another forward. If the model cannot be traced, MACs are empty (logged), never an error.

    >>> measure(nn.Linear(4, 2), torch.zeros(3, 4)).total_macs
    24
    """
    out = Costs()
    for name, mod in model.named_modules():
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        if n:
            out.params[name] = n
    out.total_params = sum(p.numel() for p in model.parameters())
    if trace is None:
        from ..graph.trace import trace_model
        try:
            inputs = dict(example_inputs) if isinstance(example_inputs, Mapping) else example_inputs
            trace = trace_model(model, inputs, "eval")
        except Exception as e:  # noqa: BLE001  (costs are a report, never a reason to fail)
            log.warning("MACs not counted: tracing %s failed: %s: %s", type(model).__name__, type(e).__name__, e)
            return out
    out.macs = {k: v for k, v in trace_macs(trace).items() if v}
    out.total_macs = sum(out.macs.values())
    return out
