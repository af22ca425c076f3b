"""Committing groups to the model: apply, verify, record history, roll back; bisect failing batches.

    >>> skipped = g.prune(candidates, skip_failed=True)   # every group that verifies is pruned
    >>> [(grp.root.name, why[:60]) for grp, why in skipped]

A batch is verified in *collect* mode (one forward finds every failing op, see ``verify.py``). When it
fails, a group that is the only one labelling a tensor of a failing op is convicted: its removal is
what changed that op's shapes, so it fails without a forward of its own, and the others are retried
together. Without a conviction, the groups implicated by a failing op are set aside and retried alone,
the rest are retried together; otherwise the batch is bisected. A group is implicated by an op when it
labels a tensor of that op or (sizes computed in module code, e.g. ``C // num_heads``) of another op run
by the same module, widening to parent modules until some group is found. Whatever is committed has
passed a verification forward of its own state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import SurgeryError
from .group import Group
from .hf import sync_hf_config
from .maps import Key, unique_ints
from .surgery import apply_plan, undo_plan
from .verify import verify_forward


class PruneMixin:
    """The pruning half of :class:`~brainsurgeon.graph.DependencyGraph` (state lives there)."""

    model: Any
    example_inputs: Any
    train_inputs: Any
    verify: bool
    traces: list[Any]
    nodes: dict[int, Any]
    edges: Any
    owners: dict[int, list[tuple[str, str]]]
    _modules: dict[str, Any]
    _canon: dict[int, str]
    history: list[dict[str, Any]]
    _removed: dict[Key, int]
    _touched: dict[tuple[str, str, int], int]
    _step: int
    _trace_step: int
    _dirty: bool
    _train_ok: bool | None

    def _runs_in_train_mode(self) -> bool: ...

    def prune(self, groups: Sequence[Group], *, skip_failed: bool = False) -> list[tuple[Group, str]]:
        """Remove every row of ``groups`` at once, then verify; on failure restore and raise SurgeryError.

        With ``skip_failed=True`` a failing batch is bisected: every group that verifies is pruned, the
        others are returned as ``(group, error message)`` and left untouched.

        >>> g.prune([grp.select([0, 1]) for grp in g.groups()])
        >>> skipped = g.prune(candidates, skip_failed=True)
        """
        if not skip_failed:
            self._prune(groups)
            return []
        # groups of one call may share a tensor dim (a concat's consumer): once one is committed, the others'
        # indices are shifted to the remaining positions instead of being refused as stale
        self._batch = {"pre": dict(self._touched), "gone": {}}
        try:
            return self._prune_skipping(groups)
        finally:
            self._batch = None

    def _prune_skipping(self, groups: Sequence[Group]) -> list[tuple[Group, str]]:
        records: list[dict[str, Any]] = []
        failed = self._skip(list(groups), records, train=False)   # eval-mode checks while bisecting ...
        if records and self.verify:
            try:                                                   # ... and train mode once at the end
                self._verify(self._removed, train_only=True)
            except SurgeryError:
                exact = self._exact_at().get(self._step, False)
                for r in reversed(records):
                    self._rollback(r)
                if self._train_ok is None and not self._runs_in_train_mode():
                    self._train_ok = False   # never ran in train mode (detection without targets): eval checks stand
                    verify, self.verify = self.verify, False
                    try:
                        for r in records:
                            self._prune(r["groups"], train=False)
                    finally:
                        self.verify = verify
                    self._exact_at()[self._step] = exact   # the same states, in the same order, as verified
                    return failed
                return self._skip(list(groups), [], train=True)
        return failed

    def _skip(self, groups: list[Group], records: list[dict[str, Any]], train: bool) -> list[tuple[Group, str]]:
        if not groups:
            return []
        try:
            records.append(self._prune(groups, train=train, collect=len(groups) > 1))
            return []
        except SurgeryError as e:
            if len(groups) == 1:
                return [(groups[0], str(e))]
            convicted = self._convicted(groups, e)
            culprits = self._implicated(groups, e)
        if convicted:   # the others, suspects included, together again: one forward when the suspects are bystanders
            bad = {id(grp) for grp, _ in convicted}
            return list(convicted) + self._skip([grp for grp in groups if id(grp) not in bad], records, train)
        if culprits and len(culprits) < len(groups):   # set aside the groups at the failing ops
            rest = [grp for grp in groups if all(grp is not c for c in culprits)]
            failed = self._skip(rest, records, train)
            for c in culprits:   # then each alone, so that a bystander is not dropped
                failed += self._skip([c], records, train)
            return failed
        half = len(groups) // 2
        return self._skip(groups[:half], records, train) + self._skip(groups[half:], records, train)

    def _convicted(self, groups: Sequence[Group], err: SurgeryError) -> list[tuple[Group, str]]:
        """``(group, message)`` for each group that is the only one of ``groups`` labelling a tensor of a
        failing op (the op's message; one entry per group)."""
        mode = getattr(err, "mode", "")
        trace = next((t for t in self.traces if t.mode == mode), None)
        if trace is None:
            return []
        live = [(grp, {k[0] for k in grp.labels}) for grp in groups if grp.version >= self._trace_step]
        out: dict[int, tuple[Group, str]] = {}
        for i, msg in zip(getattr(err, "op_indices", []), getattr(err, "messages", []), strict=False):
            if not 0 <= i < len(trace.ops):
                continue
            op = trace.ops[i]
            found = [grp for grp, ids in live if not ids.isdisjoint(op.inputs) or not ids.isdisjoint(op.outputs)]
            if len(found) == 1 and id(found[0]) not in out:
                out[id(found[0])] = (found[0], msg)
        return list(out.values())

    def _implicated(self, groups: Sequence[Group], err: SurgeryError) -> list[Group]:
        """Groups implicated by the ops where verification failed (see the module docstring)."""
        mode = getattr(err, "mode", "")
        trace = next((t for t in self.traces if t.mode == mode), None)
        idxs = [i for i in getattr(err, "op_indices", [-1]) if trace is not None and 0 <= i < len(trace.ops)]
        if not idxs or trace is None:
            return []
        live = [(grp, {k[0] for k in grp.labels}) for grp in groups if grp.version >= self._trace_step]
        hit: dict[int, Group] = {}
        for i in idxs:
            op = trace.ops[i]
            found = [grp for grp, ids in live if not ids.isdisjoint(op.inputs) or not ids.isdisjoint(op.outputs)]
            scope = op.module
            while scope:
                scope_ids = self._scope_nodes(trace, scope)
                found += [grp for grp, ids in live if not ids.isdisjoint(scope_ids)]
                if found:
                    break
                scope = scope.rpartition(".")[0]
            hit.update((id(grp), grp) for grp in found)
        return list(hit.values())

    def _scope_nodes(self, trace: Any, scope: str) -> set[int]:
        """Node ids of every op run inside module ``scope`` (its submodules included) in ``trace``."""
        cache = trace.__dict__.setdefault("_scope_nodes", {})
        if scope not in cache:
            pre = scope + "."
            cache[scope] = {nid for op in trace.ops if op.module == scope or op.module.startswith(pre)
                            for nid in (*op.inputs, *op.outputs)}
        return cache[scope]

    def _prune(self, groups: Sequence[Group], train: bool = True, collect: bool = False) -> dict[str, Any]:
        """Apply, verify (eval, and train if ``train``), commit; returns the record for :meth:`_rollback`.

        ``collect``: find every failing op of the failing mode in one forward (for bisection)."""
        batch = getattr(self, "_batch", None)
        before = batch["pre"] if batch else self._touched
        parts: dict[tuple[str, str, int], list[np.ndarray]] = {}
        for grp in groups:
            if grp.graph is not self:
                raise SurgeryError("prune: this group belongs to another DependencyGraph")
            for s in grp.slices:
                k = (s.module, s.tensor, s.dim)
                if before.get(k, -1) >= grp.version:
                    raise SurgeryError(f"prune: stale group — {s.name} dim {s.dim} was already pruned after this "
                                       f"group was built; call g.groups()/g.group() again")
                parts.setdefault(k, []).append(s.idxs.reshape(-1).numpy())
        orig = {k: unique_ints(np.concatenate(v)) for k, v in parts.items()}
        plan = orig
        if batch:   # positions removed earlier in this call: shift to the remaining ones
            plan = {}
            for k, idx in orig.items():
                gone = batch["gone"].get(k)
                if gone is not None and np.isin(idx, gone).any():
                    raise SurgeryError(f"prune: {k[0]}.{k[1]} dim {k[2]}: indices overlap channels already removed "
                                       f"by another group of this call")
                plan[k] = idx if gone is None else idx - np.searchsorted(gone, idx)
        record: dict[str, Any] = {"removed": self._removed, "touched": {k: self._touched.get(k) for k in plan},
                                  "step": self._step, "dirty": self._dirty, "history": len(self.history),
                                  "groups": list(groups),
                                  "gone": {k: batch["gone"].get(k) for k in plan} if batch else {}}
        if not plan:
            return record
        removed = dict(self._removed)
        for grp in groups:
            if grp.version >= self._trace_step and grp.labels:
                for k, c in zip(grp.labels, _labelled_counts(list(grp.labels.values())), strict=True):
                    if c:
                        removed[k] = removed.get(k, 0) + c
        attrs = self.edges.attr_updates(removed, self.nodes, self._removed)   # this commit's change only
        undo = apply_plan(self.model, plan, self.owners, attrs=attrs,
                          modules=(self._modules, self._canon))
        exact = False
        if self.verify:
            try:
                exact = self._verify(removed, train_only=False, train=train, collect=collect)
            except SurgeryError as e:
                undo_plan(undo)
                if self._train_ok is None and getattr(e, "mode", "") == "train":
                    self._train_ok = self._runs_in_train_mode()   # did train mode ever work? (model restored)
                    if not self._train_ok:
                        return self._prune(groups, train=train, collect=collect)
                raise
        record["undo"] = undo
        if batch:
            for k, idx in orig.items():
                prev = batch["gone"].get(k)
                batch["gone"][k] = idx if prev is None else unique_ints(np.concatenate((prev, idx)))
        self._removed = removed
        for k in plan:
            self._touched[k] = self._step
        self._step += 1
        self._exact_at()[self._step] = exact
        self._dirty = True
        self.history.append({"slices": [{"module": m, "tensor": t, "dim": d, "idxs": v.tolist()}
                                        for (m, t, d), v in plan.items()]})
        record["config"] = sync_hf_config(self.model)
        return record

    def _verify(self, removed: dict[Key, int], train_only: bool, train: bool = True, collect: bool = False) -> bool:
        """Raises on failure; returns whether the eval re-run followed the eval trace op for op."""
        exact = False
        if not train_only:
            exact = verify_forward(self.model, self.example_inputs, self.traces[0], removed, self.nodes,
                                   collect=collect)
        if train or train_only:
            t = next((t for t in self.traces if t.mode == "train"), None)
            if t is not None:
                verify_forward(self.model, self.train_inputs, t, removed, self.nodes, collect=collect)
            elif self._train_ok is not False:
                verify_forward(self.model, self.train_inputs, None, removed, self.nodes, mode="train")
                self._train_ok = True
        return exact

    def _exact_at(self) -> dict[int, bool]:
        """Step -> whether the model's state after that step was verified op for op against the eval trace."""
        return self.__dict__.setdefault("_exact", {})

    def planned_shapes(self) -> tuple[Any, dict[Key, int]] | None:
        """``(eval trace, removed)`` when every tensor of the model's eval forward now has exactly the trace's
        shape minus ``removed[(node, dim)]`` (nothing pruned since the trace, or the last committed prune was
        verified op for op); None when that is not known. Costs after pruning come from this, no forward.

        >>> trace, removed = g.planned_shapes()
        """
        if self._step == self._trace_step or (self.verify and self._exact_at().get(self._step, False)):
            return self.traces[0], dict(self._removed)
        return None

    def _rollback(self, record: dict[str, Any]) -> None:
        """Undo one committed :meth:`_prune` (the last one still applied)."""
        if "undo" in record:
            undo_plan(record["undo"])
        self._removed = record["removed"]
        for k, v in record["touched"].items():
            if v is None:
                self._touched.pop(k, None)
            else:
                self._touched[k] = v
        self._step, self._dirty = record["step"], record["dirty"]
        batch = getattr(self, "_batch", None)
        if batch:
            for k, v in record.get("gone", {}).items():
                if v is None:
                    batch["gone"].pop(k, None)
                else:
                    batch["gone"][k] = v
        del self.history[record["history"]:]
        sync_hf_config(self.model)


def _labelled_counts(labels: list[np.ndarray]) -> list[int]:
    """``[int((lab >= 0).sum()) for lab in labels]`` from one comparison and one running sum over all of them.

    >>> _labelled_counts([np.array([0, -1, 1]), np.array([], dtype=np.int64), np.array([-1])])
    [2, 0, 0]
    """
    lens = np.array([len(v) for v in labels], dtype=np.int64)
    ends = np.cumsum(lens)
    run = np.concatenate(([0], np.cumsum(np.concatenate(labels) >= 0)))
    return (run[ends] - run[ends - lens]).tolist()
