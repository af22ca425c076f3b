"""Verification after surgery: re-run the example input and check every pruned dim shrank as planned.

The re-run is checked op by op *while it runs* (a dispatch mode). While the op sequence matches the
original trace, each output dim that the plan touched must have exactly ``original - removed`` entries:
this catches hard-coded sizes in model code (``x[:, :64]``, ``view(B, 64, -1)``) even when the final
output shape survives. A forward that raises, or an output whose shape changed, fails too. Failures
raise :class:`VerifyError` naming the op; the caller restores the model.

With ``collect=True`` one run finds *every* failing op instead of the first: an op that raises or
produces the wrong size is recorded and replaced by zeros of the planned shape, so the forward goes on
(``VerifyError.op_indices`` lists them all). Committing a batch of groups uses this to set aside every
culprit after a single forward instead of one forward per failure::

    >>> verify_forward(model, (x,), trace, removed, nodes, collect=True)   # raises VerifyError or returns
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import SurgeryError
from .maps import Key
from .trace import _SCHEMAS, Node, OpRecord, Trace, _schema_of, flat_tensors, in_mode, run_model


class VerifyError(SurgeryError):
    """A verification failure in ``mode``; ``op_indices`` are the failing ops of that mode's trace
    (-1: not attributable to one op), ``op_index`` the first of them, ``messages`` what failed at each."""

    def __init__(self, msg: str, mode: str, op_index: int, op_indices: list[int] | None = None,
                 messages: list[str] | None = None) -> None:
        super().__init__(msg)
        self.mode = mode
        self.op_index = op_index
        self.op_indices = op_indices if op_indices is not None else [op_index]
        self.messages = messages if messages is not None else [msg] * len(self.op_indices)


_ELIDABLE = {"aten.slice", "aten.alias", "aten.view", "aten._unsafe_view", "aten.expand", "aten.clone",
             "aten.contiguous", "aten._to_copy", "aten.detach", "aten.narrow"}
# ops whose output sizes come from their integer arguments: when their inputs have the planned shapes
# but an output dim the plan did not touch changed size, the model code computed the sizes from a pruned
# width (``x.view(B, N, 3, heads, C // heads)``) and now reinterprets the memory — a failure, not a
# data-dependent divergence
_SIZED_BY_ARGS = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.expand", "aten.slice", "aten.narrow",
                  "aten.split", "aten.split_with_sizes", "aten.unflatten", "aten.repeat", "aten.select"}


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


class _Checker(TorchDispatchMode):
    """Follows the original trace op by op during the re-run and checks every planned size."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, trace: Trace | None, removed: dict[Key, int], nodes: dict[int, Node], mode: str,
                 collect: bool) -> None:
        super().__init__()
        self.ops: list[OpRecord] = trace.ops if trace is not None else []
        self.removed, self.nodes, self.mode, self.collect = removed, nodes, mode, collect
        self.pruned = {nid for nid, _ in removed}   # node ids with a dim that loses entries
        self.j = 0                           # position in the original trace
        self.matched = trace is not None     # False once the program diverged from the trace
        self.current = ""
        self.failures: list[tuple[int, str]] = []
        self.diverged = ""                   # where and why the re-run left the trace (diagnostics)
        self.paused = False                  # True while a collect-mode substitute is built (not model ops)

    def expected(self, nid: int) -> tuple[int, ...]:
        if nid not in self.pruned:   # most tensors: their traced shape
            return self.nodes[nid].shape
        return tuple(n - self.removed.get((nid, d), 0) for d, n in enumerate(self.nodes[nid].shape))

    def fail(self, j: int, msg: str) -> None:
        if not self.collect:
            raise VerifyError(msg, self.mode, j)
        self.failures.append((j, msg))

    def _skip_elided(self, name: str) -> None:
        """Original ops the re-run skipped (a slice that became whole) must have become no-ops."""
        while self.j < len(self.ops) and self.ops[self.j].name != name and (
                self.ops[self.j].name in _ELIDABLE or self.ops[self.j].name.startswith("brainsurgeon.")):
            op = self.ops[self.j]
            if op.name.startswith("brainsurgeon."):   # the tracer's own records (writes into views)
                self.j += 1
                continue
            if op.inputs and op.outputs and _squeezed(self.expected(op.inputs[0])) != _squeezed(
                    self.expected(op.outputs[0])):   # (a dim pruned to size 1 lets matmul skip a reshape)
                self.fail(self.j, f"{self.mode}-mode check: {op.name} (op {self.j}) was skipped after pruning — "
                                  f"the code now uses the whole tensor {self.expected(op.inputs[0])} where it took "
                                  f"{self.expected(op.outputs[0])} (module code with a hard-coded size?); "
                                  f"the model was restored")
            self.j += 1

    def _substitute(self, func: Any, op: OpRecord) -> Any:
        """Zeros of the planned output shapes, in the op's return structure (collect mode goes on)."""
        rets = func._schema.returns
        ts = [torch.zeros(self.expected(nid), dtype=self.nodes[nid].dtype or torch.float32) for nid in op.outputs]
        if len(rets) == 1 and str(rets[0].type).startswith("List"):
            return ts
        if len(rets) != len(ts) or any(str(r.type) != "Tensor" for r in rets):
            return None
        return ts[0] if len(ts) == 1 else tuple(ts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self.paused:
            return func(*args, **(kwargs or {}))
        sch = _SCHEMAS.get(id(func)) or _schema_of(func)
        name = self.current = sch[0]
        ops, j = self.ops, self.j
        if self.matched and (j >= len(ops) or ops[j].name != name):   # (the common case: the next op matches)
            self._skip_elided(name)
            if self.j >= len(ops) or ops[self.j].name != name:
                self.matched = False   # data-dependent control flow or size-dependent decompositions
                self.diverged = f"op {self.j}: ran {name}, trace has " + \
                    (ops[self.j].name if self.j < len(ops) else "no more ops")
        try:
            out = sch[6](*args, **kwargs) if kwargs else sch[6](*args)   # the overload's entry (trace._schema_of)
        except Exception as e:
            sub = self._substitute(func, self.ops[self.j]) if self.collect and self.matched else None
            if sub is None:
                raise
            self.failures.append((self.j, f"{self.mode}-mode forward failed after pruning, in {name} (op {self.j}): "
                                          f"{type(e).__name__}: {str(e)[:300]}; the model was restored"))
            self.j += 1
            return sub
        if not self.matched:
            return out
        j = self.j
        op = ops[j]
        nodes, removed, pruned = self.nodes, self.removed, self.pruned
        if isinstance(out, torch.Tensor):   # one output: checked inline (every output exactly as planned is
            nid = op.outputs[0] if len(op.outputs) == 1 else None   # the common case: nothing moved)
            if nid is not None and out.shape == (nodes[nid].shape if nid not in pruned else self.expected(nid)):
                self.j = j + 1
                return out
            flat = [out]
        else:
            flat = flat_tensors(out)
            if len(op.outputs) == len(flat) and all(o.shape == self.expected(nid)
                                                    for nid, o in zip(op.outputs, flat, strict=True)):
                self.j = j + 1
                return out
        if len(op.outputs) != len(flat) or any(len(nodes[nid].shape) != o.dim()
                                                for nid, o in zip(op.outputs, flat, strict=False)):
            self.matched = False   # the program diverged: only the final output shapes are checked
            self.diverged = f"op {j}: {name} returned {len(flat)} tensors / other ranks"
            return out
        moved = [(nid, d, o.shape[d]) for nid, o in zip(op.outputs, flat, strict=False) for d in range(o.dim())
                 if removed.get((nid, d)) is None and o.shape[d] != nodes[nid].shape[d]]
        if moved:
            inputs_as_planned = all(tuple(a.shape) == self.expected(nid)   # flat_tensors yields tensors only
                                    for a, nid in zip(flat_tensors(args), op.inputs, strict=False))
            if name not in _SIZED_BY_ARGS or not inputs_as_planned:
                self.matched = False   # data-dependent sizes (nonzero, topk of a count): only final shapes checked
                self.diverged = f"op {j}: {name} changed dim {moved[0][1]} to {moved[0][2]}"
                return out
            nid, d, got = moved[0]
            self.j += 1
            self.fail(j, f"{self.mode}-mode check: {name} (op {j}) produced {got} entries along dim {d} where the "
                         f"plan keeps {nodes[nid].shape[d]}: the model code derives this size from a pruned width "
                         f"(e.g. a head count or head size held in a module attribute); the model was restored")
            sub = self._substitute(func, op)
            return out if sub is None else sub
        self.j += 1
        for nid, o in zip(op.outputs, flat, strict=False):
            orig = nodes[nid].shape
            for d in range(o.dim()):
                c = removed.get((nid, d))
                if c is not None and o.shape[d] != orig[d] - c:
                    self.fail(j, f"{self.mode}-mode check: {name} (op {j}) produced {o.shape[d]} entries along dim "
                                 f"{d}, expected {orig[d] - c} after removing {c} (module code with a hard-coded "
                                 f"size?); the model was restored")
                    sub = self._substitute(func, op)
                    return out if sub is None else sub
        return out


def _composite_target(c: _Checker) -> int | None:
    """The trace op a failing composite call stands for (the next sized-by-arguments view, past at most two
    clones), where :class:`_CatchComposite` substitutes its planned output; None: it cannot."""
    j = c.j
    while c.matched and j < len(c.ops) and c.ops[j].name in ("aten.clone", "aten.contiguous") and j - c.j < 2:
        j += 1
    if c.matched and j < len(c.ops) and c.ops[j].name in _SIZED_BY_ARGS and len(c.ops[j].outputs) == 1:
        return j
    return None


class _CatchComposite(TorchFunctionMode):
    """Collect mode, one level up: composite ops (``reshape``) check sizes *before* dispatching, so a
    hard-coded size fails there; substitute the planned output of the view the trace has next."""

    def __init__(self, checker: _Checker) -> None:
        super().__init__()
        self.c = checker

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        try:
            return func(*args, **(kwargs or {}))
        except VerifyError:
            raise
        except Exception as e:
            c = self.c
            j = _composite_target(c)
            if j is None:
                raise
            c.failures.append((j, f"{c.mode}-mode forward failed after pruning, in {getattr(func, '__name__', func)} "
                                  f"(op {j}): {type(e).__name__}: {str(e)[:300]}; the model was restored"))
            c.j = j + 1
            nid = c.ops[j].outputs[0]
            c.paused = True   # the substitute's own ops are not the model's: the checker must not match them
            try:
                return torch.zeros(c.expected(nid), dtype=c.nodes[nid].dtype or torch.float32)
            finally:
                c.paused = False


def _where(e: BaseException) -> str:
    """The innermost module method running when ``e`` was raised (``'BatchNorm1d.forward'``), from its traceback."""
    tb, where = e.__traceback__, "the model code"
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, nn.Module):
            where = f"{type(obj).__name__}.{tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return where


def verify_forward(model: nn.Module, example_inputs: Any, trace: Trace | None, removed: dict[Key, int],
                   nodes: dict[int, Node], mode: str | None = None, collect: bool = False) -> bool:
    """Run ``model`` in the trace's mode (restoring mode and buffers) and compare with ``trace``.

    Raises :class:`VerifyError` at the first failing op, or with ``collect=True`` after the run, listing
    every failing op. Returns whether the re-run followed ``trace`` op for op to the end: then every
    tensor had exactly the trace's shape minus ``removed`` (costs can be counted from the trace).
    """
    mode = trace.mode if trace is not None else (mode or "eval")
    if trace is not None and collect:
        # collect mode in two passes: the op-level checker collects on its own; the function-level catch of
        # composite ops (a TorchFunctionMode around every call) costs a few % of a small model's prune, so it
        # runs only when the first pass raised out of the forward where that catch would have gone on
        try:
            return _verify(model, example_inputs, trace, removed, nodes, mode, collect=True, composite=False)
        except VerifyError as e:
            if not getattr(e, "escaped", False):
                raise
    return _verify(model, example_inputs, trace, removed, nodes, mode, collect=collect, composite=collect)


def _verify(model: nn.Module, example_inputs: Any, trace: Trace | None, removed: dict[Key, int],
            nodes: dict[int, Node], mode: str, collect: bool, composite: bool) -> bool:
    rec = _Checker(trace, removed, nodes, mode, collect)
    if trace is None:   # nothing to compare op by op: a plain forward; a failure is named from its traceback
        try:
            with in_mode(model, mode, keep_buffers=mode == "train"), torch.no_grad():
                run_model(model, example_inputs)
            return False
        except Exception as e:  # noqa: BLE001  (any failure of the user's forward is reported, model restored)
            raise VerifyError(f"{mode}-mode forward failed after pruning, in {_where(e)}: {type(e).__name__}: "
                              f"{str(e)[:300]}; the model was restored", mode, -1) from e
    try:
        # buffers change only in train mode (BatchNorm statistics): snapshot them only then
        with in_mode(model, mode, keep_buffers=mode == "train"), torch.no_grad(), \
                (_CatchComposite(rec) if composite else contextlib.nullcontext()), rec:
            out = run_model(model, example_inputs)
    except VerifyError:
        raise
    except Exception as e:  # noqa: BLE001  (any failure of the user's forward is reported, model restored)
        j = rec.j if rec.matched else -1
        fails = rec.failures + [(j, f"{mode}-mode forward failed after pruning, in {rec.current or 'the model code'}"
                                    f": {type(e).__name__}: {str(e)[:300]}; the model was restored")]
        err = VerifyError(fails[0][1], mode, fails[0][0], [f[0] for f in fails], [f[1] for f in fails])
        # verify_forward retries with the composite catch only where that catch would have substituted (the
        # checker still follows the trace and the next op is a sized view): otherwise it re-raises the same
        # error, and a retry would only double the cost of every failing batch (Res2Net's split widths)
        err.escaped = collect and not composite and _composite_target(rec) is not None
        raise err from e
    if trace is None:
        return False
    if rec.matched:
        rec._skip_elided("")                       # trailing ops the re-run skipped
        rec.matched = rec.j == len(trace.ops)
    fails = rec.failures
    flat = flat_tensors(out)
    if len(flat) != len(trace.output_shapes) or any(
            len(o.shape) != len(s) or (rec.matched and tuple(o.shape) != s) for o, s in zip(flat, trace.output_shapes,
                                                                                             strict=False)):
        fails = fails + [(-1, f"{mode}-mode output shapes changed after pruning: {[tuple(o.shape) for o in flat][:4]}"
                              f" vs {trace.output_shapes[:4]}; the model was restored")]
    if fails:
        raise VerifyError(fails[0][1], mode, fails[0][0], [f[0] for f in fails], [f[1] for f in fails])
    return rec.matched
