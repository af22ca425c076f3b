"""Verification after surgery: re-run the example input and check every pruned dim shrank as planned.

The re-run is recorded op by op. While the op sequence matches the original trace, each output dim
that the plan touched must have exactly ``original - removed`` entries: this catches hard-coded
sizes in model code (``x[:, :64]``, ``view(B, 64, -1)``) even when the final output shape survives.
A forward that raises, or an output whose shape changed, fails too. Failures raise SurgeryError
naming the op; the caller restores the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import SurgeryError
from .maps import Key
from .trace import Node, Trace, flat_tensors, run_model


class VerifyError(SurgeryError):
    """A verification failure at op ``op_index`` of the ``mode`` trace (-1 when not attributable)."""

    def __init__(self, msg: str, mode: str, op_index: int) -> None:
        super().__init__(msg)
        self.mode = mode
        self.op_index = op_index


class _Shapes(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []
        self.current = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.current = func.overloadpacket._qualified_op_name.replace("::", ".")
        out = func(*args, **(kwargs or {}))
        self.ops.append((self.current, [tuple(o.shape) for o in flat_tensors(out)]))
        return out


_ELIDABLE = {"aten.slice", "aten.alias", "aten.view", "aten._unsafe_view", "aten.expand", "aten.clone",
             "aten.contiguous", "aten._to_copy", "aten.detach", "aten.narrow"}


def _check_elided(op: Any, removed: dict[Key, int], nodes: dict[int, Node], mode: str, j: int) -> None:
    """An op of the original run that the pruned run skipped must have become a no-op (same shape in/out)."""
    if not op.inputs or not op.outputs:
        return
    src, dst = op.inputs[0], op.outputs[0]

    def expected(nid: int) -> tuple[int, ...]:
        return tuple(n - removed.get((nid, d), 0) for d, n in enumerate(nodes[nid].shape))

    if expected(src) != expected(dst):
        raise VerifyError(f"{mode}-mode check: {op.name} (op {j}) was skipped after pruning — the code now uses "
                          f"the whole tensor {expected(src)} where it took {expected(dst)} (module code with a "
                          f"hard-coded size?); the model was restored", mode, j)


def verify_forward(model: nn.Module, example_inputs: Any, trace: Trace | None, removed: dict[Key, int],
                   nodes: dict[int, Node], mode: str | None = None) -> None:
    """Run ``model`` in the trace's mode (restoring mode and buffers) and compare with ``trace``."""
    mode = trace.mode if trace is not None else (mode or "eval")
    was = {m: m.training for m in model.modules()}
    saved = {id(b): b.detach().clone() for b in model.buffers()} if mode == "train" else {}
    rec = _Shapes()
    try:
        model.train(mode == "train")
        with torch.no_grad(), rec:
            out = run_model(model, example_inputs)
    except Exception as e:  # noqa: BLE001  (any failure of the user's forward is reported, model restored)
        matched = trace is not None and all(i < len(trace.ops) and trace.ops[i].name == n
                                            for i, (n, _) in enumerate(rec.ops))
        raise VerifyError(f"{mode}-mode forward failed after pruning, in {rec.current or 'the model code'}: "
                          f"{type(e).__name__}: {str(e)[:300]}; the model was restored", mode,
                          len(rec.ops) if matched else -1) from e
    finally:
        for m, f in was.items():
            m.training = f
        if saved:
            with torch.no_grad():
                for b in model.buffers():
                    if id(b) in saved and b.shape == saved[id(b)].shape:
                        b.copy_(saved[id(b)])
    if trace is None:
        return
    matched = True
    j = 0                                    # position in the original trace
    for name, shapes in rec.ops:
        while j < len(trace.ops) and trace.ops[j].name != name and trace.ops[j].name in _ELIDABLE:
            _check_elided(trace.ops[j], removed, nodes, mode, j)   # a slice that became whole is skipped
            j += 1
        if j >= len(trace.ops) or trace.ops[j].name != name:
            matched = False
            break
        outs = trace.ops[j].outputs
        if len(outs) != len(shapes) or any(
                len(nodes[nid].shape) != len(shape)
                or any(removed.get((nid, d)) is None and shape[d] != nodes[nid].shape[d] for d in range(len(shape)))
                for nid, shape in zip(outs, shapes, strict=False)):
            matched = False   # the program diverged (data-dependent control flow, size-dependent decompositions)
            break
        for nid, shape in zip(outs, shapes, strict=False):
            orig = nodes[nid].shape
            for d in range(len(shape)):
                c = removed.get((nid, d))
                if c is not None and shape[d] != orig[d] - c:
                    raise VerifyError(f"{mode}-mode check: {name} (op {j}) produced {shape[d]} entries along dim "
                                      f"{d}, expected {orig[d] - c} after removing {c} (module code with a "
                                      f"hard-coded size?); the model was restored", mode, j)
        j += 1
    matched = matched and j == len(trace.ops)
    flat = flat_tensors(out)
    if len(flat) != len(trace.output_shapes) or any(
            len(o.shape) != len(s) or (matched and tuple(o.shape) != s) for o, s in zip(flat, trace.output_shapes,
                                                                                         strict=False)):
        raise VerifyError(f"{mode}-mode output shapes changed after pruning: "
                          f"{[tuple(o.shape) for o in flat][:4]} vs {trace.output_shapes[:4]}; the model was restored",
                          mode, -1)
