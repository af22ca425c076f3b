"""Coupled dimensions: index maps between (tensor, dim) nodes, and the closure of a pruning request.

Every (node id, dim) of a traced tensor is a *key*. Op rules (``rules.py``) connect keys with index maps:

* ``gather(a, b, pos)``: position ``i`` of ``a`` is position ``pos[i]`` of ``b`` (identity, cat offsets,
  slices, index_select, LSTM gates ``j -> j % H``, flatten ``j -> j // (H*W)``: many-to-one maps couple
  every ``j`` with the same ``pos[j]``);
* ``split(c, atoms)``: a dim that a reshape splits or merges is a mixed-radix number over *atoms*
  (the common refinement of both sides' dims). A request on ``c`` is carried to the atoms it can be
  expressed on; if none, it is coarsened onto one atom (whole heads, whole window blocks, ...).

A request is a *labelling*: position -> logical channel (row) id, -1 = untouched. The closure
(:func:`closure`) propagates labels over the maps with a worklist; a key is revisited only when it
gains labelled positions, and two labels that meet on one position are merged (union-find), so it
always terminates. Example, flatten -> linear::

    conv.weight dim0 (8)  --identity-->  act dim1 (8)  --split-->  atoms (8, 4)  -->  flat (32)  -->  fc.weight dim1
    request rows [2, 5] on conv.weight dim0 -> fc.weight dim1 rows [[8..11], [20..23]]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

Key = tuple[int, int]  # (node id, dim); atoms of reshapes use negative node ids
_FAST_IDENTITY = True   # closure: identity links copy whole label arrays (False: apply per link, the reference)


def unique_ints(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` (sorted distinct values, flattened) for index arrays, sort-based: numpy 2's default
    hash-based ``np.unique`` spends ~18 ms on its first call in a process, more than a whole small prune.

    >>> unique_ints(np.array([3, 1, 3, 0]))
    array([0, 1, 3])
    """
    a = np.sort(np.asarray(a).reshape(-1))
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


@dataclass
class Edges:
    """Adjacency of the coupled-dimension graph; built once per trace, queried by every closure."""

    size: dict[Key, int] = field(default_factory=dict)
    gathers: dict[Key, list[tuple[Key, np.ndarray | None, bool]]] = field(default_factory=dict)
    splits: dict[Key, list[list[tuple[Key, np.ndarray]]]] = field(default_factory=dict)
    blocked: dict[Key, str] = field(default_factory=dict)
    inexact: dict[Key, str] = field(default_factory=dict)
    attrs: list[tuple[str, str, tuple[Key, ...]]] = field(default_factory=list)
    next_atom: int = -1
    _doomed: dict[Key, bool] = field(default_factory=dict, repr=False)

    def _add(self, key: Key, size: int) -> None:
        self.size.setdefault(key, size)

    def link(self, a: Key, b: Key) -> None:
        """Identity map between two keys of equal size (no-op on size-1 dims or unequal sizes)."""
        size = self.size
        sa = size.get(a)
        if a == b or sa != size.get(b) or (sa or 0) <= 1:
            return
        self.gathers.setdefault(a, []).append((b, None, True))
        self.gathers.setdefault(b, []).append((a, None, True))

    def gather(self, a: Key, b: Key, pos: np.ndarray) -> None:
        """Position ``i`` of ``a`` is position ``pos[i]`` of ``b`` (``len(pos) == size[a]``)."""
        pos = np.asarray(pos, dtype=np.int64)
        if len(pos) != self.size.get(a) or (len(pos) and (pos.min() < 0 or pos.max() >= self.size.get(b, 0))):
            raise ValueError(f"bad gather map {a}->{b}: {len(pos)} positions for sizes {self.size.get(a)}, "
                             f"{self.size.get(b)}")
        if self.size[a] <= 1 and self.size[b] <= 1:
            return
        self.gathers.setdefault(a, []).append((b, pos, True))
        self.gathers.setdefault(b, []).append((a, pos, False))

    def atom(self, size: int) -> Key:
        """A new virtual key of ``size`` (one factor of a reshape)."""
        key = (self.next_atom, 0)
        self.next_atom -= 1
        self.size[key] = size
        return key

    def split(self, c: Key, atoms: list[tuple[Key, int]]) -> None:
        """``c`` is the mixed-radix number over ``atoms`` (outermost first); sizes multiply to size[c]."""
        atoms = [(k, s) for k, s in atoms if s > 1]
        if len(atoms) == 1:
            self.link(c, atoms[0][0])
            return
        total = self.size[c]
        j = np.arange(total, dtype=np.int64)
        inner = total
        parts = []
        for k, s in atoms:
            inner //= s
            digit = (j // inner) % s
            parts.append((k, digit))
            self.gathers.setdefault(k, []).append((c, digit, False))  # atom -> c: reverse of c->atom
        self.splits.setdefault(c, []).append(parts)

    def doomed(self, key: Key, limit: int = 64) -> bool:
        """Whether ``key`` is one identity link away from a blocked key, through identity links only
        (a reshape factor that a permute hands to ``select(dim=0)``, e.g. the 3 of a fused qkv)."""
        if key not in self._doomed:
            seen, todo, hit = {key}, [key], False
            while todo and not hit and len(seen) < limit:
                k = todo.pop()
                hit = k in self.blocked
                for other, pos, _ in self.gathers.get(k, ()):
                    if pos is None and other not in seen:
                        seen.add(other)
                        todo.append(other)
            self._doomed[key] = hit
        return self._doomed[key]

    def block(self, key: Key, reason: str) -> None:
        """Requests that reach ``key`` are refused; ``reason`` names the op (first reason wins)."""
        if self.size.get(key, 0) > 1:
            self.blocked.setdefault(key, reason)

    def module_attr(self, module: str, attr: str, keys: tuple[Key, ...]) -> None:
        """Attribute ``attr`` of ``module`` mirrors the sizes of ``keys`` (a parameter-less LayerNorm's
        ``normalized_shape``, a GroupNorm's ``num_channels``): surgery updates it when those dims shrink."""
        self.attrs.append((module, attr, keys))

    def attr_updates(self, removed: dict[Key, int], nodes: dict, before: dict[Key, int] | None = None
                     ) -> dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
        """``{module: {attr: (old sizes, new sizes)}}`` for every recorded attribute whose dims go from
        ``before[key]`` to ``removed[key]`` positions removed since the trace (``nodes`` give the traced
        sizes); see ``surgery.apply_plan(attrs=...)``. Old sizes are the current ones, so a later commit of
        the same trace scales an attribute from what the earlier one left, not from the traced size again.

        >>> e.attr_updates({(7, 1): 3}, g.nodes)
        {'0': {'normalized_shape': ((16,), (13,))}}
        """
        before = before or {}
        out: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for module, attr, keys in self.attrs:
            if all(removed.get(k, 0) == before.get(k, 0) for k in keys):
                continue
            traced = [nodes[k[0]].shape[k[1]] for k in keys]
            old = tuple(t - before.get(k, 0) for t, k in zip(traced, keys, strict=True))
            new = tuple(t - removed.get(k, 0) for t, k in zip(traced, keys, strict=True))
            out.setdefault(module, {}).setdefault(attr, (old, new))
        return out

    def mark_inexact(self, key: Key, reason: str) -> None:
        """Removing positions of ``key`` is allowed but not output-preserving even when zeroed (mean, LayerNorm)."""
        self.inexact.setdefault(key, reason)


class _Labels:
    """Per-key label arrays plus a union-find over label ids."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.lab: dict[Key, np.ndarray] = {}
        self.merged = False   # whether any two labels were merged (else every label is its own root)
        self.ver: dict[Key, int] = {}   # how many times each key's array was written
        self.same: dict[tuple[Key, Key], tuple[int, int]] = {}   # (a, b) -> versions at which lab[a] == lab[b]

    def find(self, x: np.ndarray) -> np.ndarray:
        p = self.parent
        x0 = x
        while True:
            px = p[x]
            if (px == x).all():
                break
            x = p[px]
        if x is not x0:
            p[x0] = x   # path compression (a root is never larger than its members: the invariant holds)
        return x

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of ``a[i]`` and ``b[i]`` for every ``i``, all pairs at once: each round links
        every pair's larger root under the smallest root it is paired with (``minimum.at``: one root paired
        with many, e.g. a head's label with each of its 16 channels, links in one round, not one per round;
        the next round re-checks), so parents only ever point to smaller ids, the loop ends, and each set's
        root is its smallest id (what ``find`` returns does not depend on the order of the links)."""
        p = self.parent
        while len(a):
            ra, rb = self.find(a), self.find(b)
            ne = ra != rb
            a, b = ra[ne], rb[ne]
            if len(a):
                self.merged = True
                np.minimum.at(p, np.maximum(a, b), np.minimum(a, b))

    def apply(self, key: Key, size: int, pos: np.ndarray, labels: np.ndarray) -> bool:
        """Label ``pos`` of ``key`` with ``labels``; merge labels that meet. Returns True if positions were added."""
        cur = self.lab.get(key)
        if cur is None:   # a new key: every position is fresh (labels are >= 0)
            cur = np.empty(size, dtype=np.int64)
            cur.fill(-1)
            self.lab[key] = cur
            self.ver[key] = 0
            cur[pos] = labels
            added = len(pos) > 0
            now = cur[pos]
        else:
            old = cur[pos]
            if old.shape == labels.shape and (old == labels).all():   # nothing new or to merge (the way back)
                return False
            fresh = old < 0
            added = bool(fresh.any())
            if added:
                cur[pos[fresh]] = labels[fresh]
                self.ver[key] += 1
            now = cur[pos] if added else old
        diff = now != labels
        if diff.any():
            self.union(now[diff], labels[diff])
        return added


@dataclass
class Closure:
    """Result of :func:`closure`: labels per key (canonical row ids 0..n-1), blocked/inexact reasons."""

    labels: dict[Key, np.ndarray]
    n: int
    blocked: list[tuple[Key, str]]
    inexact: list[tuple[Key, str]]


def _choose_atoms(lab: _Labels, la: np.ndarray, parts: list[tuple[Key, np.ndarray]], edges: Edges,
                  prefer_fits: bool = True) -> list[tuple[Key, np.ndarray]]:
    """Atoms to carry a labelling of a split dim to: already labelled ones, else those it is expressible
    on (every touched slab fully labelled with one label), else one it fits without merging labels,
    else the outermost (coarsening: whole heads / whole blocks) — skipping atoms that lead straight to
    a blocked dim (the q/k/v factor of a fused projection, taken apart by ``select``)."""
    size = edges.size
    chosen = [(k, d) for k, d in parts if k in lab.lab]
    if chosen:
        return chosen
    on = la >= 0
    f = lab.find(la[on])
    clean, fits = [], []
    for k, d in parts:
        dd = d[on]
        pairs = unique_ints(dd * (int(f.max()) + 1) + f)
        per_slab = np.bincount(pairs // (int(f.max()) + 1), minlength=size[k])
        single = bool((per_slab <= 1).all())
        if single:
            fits.append((k, d))
            full = np.bincount(dd, minlength=size[k])
            touched = full > 0
            if (full[touched] == len(d) // size[k]).all():
                clean.append((k, d))
    if clean:
        return clean
    def is_open(k: Key) -> bool:
        return k not in edges.blocked and not edges.doomed(k)

    open_fits = [p for p in fits if is_open(p[0])]
    if prefer_fits and (open_fits or fits):
        return (open_fits or fits)[:1]
    open_parts = [p for p in parts if is_open(p[0])]
    return (open_parts or parts)[:1]


def closure(edges: Edges, root: Key, root_pos: np.ndarray, root_rows: np.ndarray,
            stop_when_blocked: bool = False, prefer_fits: bool = True) -> Closure:
    """Propagate the labelling ``root_pos[i] -> root_rows[i]`` of ``root`` over every index map.

    Terminates because a key is re-queued only when it gains labelled positions (finitely many),
    and label merges are union-find operations on a fixed set of ids.
    """
    n0 = int(root_rows.max()) + 1 if len(root_rows) else 0
    lab = _Labels(n0)
    lab.apply(root, edges.size[root], np.asarray(root_pos, dtype=np.int64), np.asarray(root_rows, dtype=np.int64))
    work: deque[Key] = deque()
    queued: set[Key] = set()
    blocked: list[tuple[Key, str]] = []
    def reach(k: Key) -> bool:
        """Queue a key that gained labels; False when it is blocked and the caller stops at the first block."""
        if stop_when_blocked and k in edges.blocked:
            blocked.append((k, edges.blocked[k]))
            return False
        if k not in queued:
            work.append(k)
            queued.add(k)
        return True

    ok = reach(root)
    fast = _FAST_IDENTITY and len(root_pos) > 0   # every queued key then has a labelled position
    lablab, ver, same, size, gathers = lab.lab, lab.ver, lab.same, edges.size, edges.gathers
    while work and ok:
        key = work.popleft()
        queued.discard(key)
        if key in edges.blocked:
            blocked.append((key, edges.blocked[key]))
        la = lablab[key]
        v0 = ver[key]
        # the labelled positions as of v0; only the identity fast path runs before they are needed, and it never
        # writes ``la``, so computing them lazily gives what computing them here gives
        on = lon = None
        for other, pos, forward in gathers.get(key, ()):
            if pos is None:   # identity (most links): copied whole, or skipped on the way back
                if fast and ver[key] == v0:
                    cur = lablab.get(other)
                    if cur is None:   # what apply(other, size, on, lon) makes of a new key: a copy of la
                        lablab[other] = la.copy()
                        ver[other] = 0
                        same[(key, other)] = same[(other, key)] = (v0, 0)
                        if not (ok := reach(other)):
                            break
                        continue
                    if same.get((key, other)) == (v0, ver[other]):   # equal arrays: apply would add nothing
                        continue
                if on is None:
                    on = np.nonzero(la >= 0)[0]
                    lon = la[on]
                if len(on) and lab.apply(other, size[other], on, lon) and not (ok := reach(other)):
                    break
                continue
            if on is None:
                on = np.nonzero(la >= 0)[0]
                lon = la[on]
            if forward:
                tp, tl = pos[on], lon
            else:
                lb = la[pos]
                sel = np.nonzero(lb >= 0)[0]
                tp, tl = sel, lb[sel]
            if len(tp) and lab.apply(other, size[other], tp, tl) and not (ok := reach(other)):
                break
        for parts in edges.splits.get(key, ()) if ok else ():
            if on is None:
                on = np.nonzero(la >= 0)[0]
                lon = la[on]
            for atom, digit in _choose_atoms(lab, la, parts, edges, prefer_fits):
                if lab.apply(atom, size[atom], digit[on], lon) and not (ok := reach(atom)):
                    break
            if not ok:
                break
    inexact = [(k, edges.inexact[k]) for k in lab.lab if k in edges.inexact]   # atoms too (head_dim scale)
    rl = lab.lab[root]
    if not lab.merged and np.array_equal(rl[rl >= 0], np.arange(n0)):   # rows 0..n-1 already canonical
        return Closure({k: arr for k, arr in lab.lab.items() if k[0] >= 0}, n0, blocked, inexact)
    # canonical row ids: ordered by first appearance on the root
    roots = lab.find(np.arange(n0, dtype=np.int64)) if n0 else np.zeros(0, dtype=np.int64)
    order = []
    seen = set()
    for v in lab.find(rl[rl >= 0]).tolist():
        if v not in seen:
            seen.add(v)
            order.append(v)
    for v in unique_ints(roots).tolist():
        if v not in seen:
            seen.add(v)
            order.append(v)
    remap = np.full(max(n0, 1), -1, dtype=np.int64)
    remap[np.array(order, dtype=np.int64)] = np.arange(len(order))
    # label id -> canonical row through its root, plus a last entry -1 that the unlabelled (-1) positions index:
    # one gather per key instead of a find per key
    table = np.append(remap[roots], -1) if n0 else np.full(1, -1, dtype=np.int64)
    return Closure({k: table[arr] for k, arr in lab.lab.items() if k[0] >= 0}, len(order), blocked, inexact)
