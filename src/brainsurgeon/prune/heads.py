"""Within-head dims: remove the same dims from every attention head, so head_dim stays uniform.

For an attention module with ``H`` heads of ``hd`` dims, labelling query-projection output ``j`` with
``j % hd`` and closing over the graph gives one group whose row ``d`` is dim ``d`` of every head, with the
keys coupled through ``Q K^T`` (GQA: a kv head's dim is shared by its query heads; rotary embeddings pair
``d`` with ``d + hd/2``). The values and the output projection form a second group. Transformers and
``nn.MultiheadAttention`` reshape q, k and v with one ``head_dim``, so both groups must lose the same
number of dims per head: :func:`pair_groups` joins them row by row, each in its own importance order::

    >>> sets = head_dim_sets(g)   # g.group(q_proj, "out", all, rows=j % hd) etc., one list per coupled set
    >>> joint, scores = pair_groups(sets[0], [score("l2", grp, stats, cfg) for grp in sets[0]])
    >>> g.prune([joint.select(torch.arange(2))])  # the 2 weakest dims of every head, verified

The same structure as Torch-Pruning's ``prune_head_dims`` option (the code of Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023), here derived from the traced index maps instead of per-model
attention specs, and paired across q/k and v/o by count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedOpError
from ..graph.group import Group, Slice
from ..graph.hf import Q_NAMES, V_NAMES


def _child(m: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(m, n, None), nn.Linear)), None)


def attention_roots(model: nn.Module) -> list[tuple[str, list[tuple[str, str, int]], int]]:
    """``(module, [(root module, tensor, dim), ...], head_dim)`` per attention module: the query and value
    projections' outputs (transformers), or ``in_proj_weight`` dim 1 (``nn.MultiheadAttention``, whose
    q/k/v widths are tied to ``embed_dim``)."""
    out = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out.append((name, [(name, "in_proj_weight", 1)], int(m.head_dim)))
            continue
        head = next((getattr(m, a) for a in ("head_dim", "attention_head_size")
                     if isinstance(getattr(m, a, None), int)), None)
        q, v = _child(m, Q_NAMES), _child(m, V_NAMES)
        if head and q and v:
            out.append((name, [(pre + q, "weight", 0), (pre + v, "weight", 0)], int(head)))
    return out


def _dim_group(graph: Any, root: tuple[str, str, int], head: int) -> Group | None:
    """Row ``d`` = dim ``d`` of every head of ``root`` (None when blocked, unused or a single row)."""
    module, tensor, dim = root
    size = getattr(graph.model.get_submodule(module), tensor).shape[dim]
    pos = np.arange(size)
    try:
        grp = graph.group(module, dim, pos, tensor=tensor, rows=pos % head)
    except (UnsupportedOpError, ConfigError):
        return None
    return grp if grp.n >= 2 else None


def head_dim_sets(graph: Any) -> list[list[Group]]:
    """Groups of within-head dims that must lose the same count per head, one list per coupled set.

    A q/k group can span several layers (a shared rotary table); the v/o groups of every attention
    module it reaches join its set. Modules whose dims are blocked (an op without a rule, a model
    output) are left out.
    """
    roots = attention_roots(graph.model)
    by_module: dict[str, list[Group | None]] = {}
    heads: dict[str, int] = {}
    for name, rs, head in roots:
        by_module[name] = [_dim_group(graph, r, head) for r in rs]
        heads[name] = head
    sets: list[list[Group]] = []
    done: set[str] = set()
    for name, _, _ in roots:
        if name in done:
            continue
        first = by_module[name][0]
        if first is None or any(g is None for g in by_module[name]):
            done.add(name)
            continue
        members = {name}
        touched = {s.module for s in first.slices}
        for other, _, _ in roots:   # modules whose q/k dims the first group already covers
            pre = f"{other}."
            if other not in members and any(t.startswith(pre) for t in touched):
                members.add(other)
        groups = [first]
        for mname in sorted(members):
            done.add(mname)
            for grp in by_module[mname][1:]:
                if grp is not None:
                    groups.append(grp)
            if any(g is None for g in by_module[mname]):
                groups = []
                break
        if groups:
            sets.append(groups)
    return sets


def pair_groups(groups: list[Group], scores: list[torch.Tensor]) -> tuple[Group, torch.Tensor]:
    """Join count-coupled groups into one: joint row ``i`` holds block ``i`` of each group's rows in
    ascending score order (blocks sized so each removes the same dims per head). Returns the joint
    group (rows ascending by summed score) and its scores.

    >>> joint, s = pair_groups([qk, vo], [score_qk, score_vo])
    """
    n_rows = [g.n for g in groups]   # each group covers every dim of every head: a row is hd / n dims per head
    n_joint = math.gcd(*n_rows)      # a joint row removes hd / n_joint dims per head from every group
    blocks = [n // n_joint for n in n_rows]
    slices: list[Slice] = []
    labels: dict[Any, np.ndarray] = {}
    seen: set[tuple[str, str, int]] = set()
    joint_scores = torch.zeros(n_joint, dtype=torch.float64)
    for g, s, b in zip(groups, scores, blocks, strict=True):
        order = torch.argsort(s.to(torch.float64), stable=True)
        joint_scores += s.to(torch.float64)[order].reshape(n_joint, b).sum(1)
        remap = np.full(g.n + 1, -1, dtype=np.int64)
        remap[order.numpy()] = np.arange(g.n) // b
        for sl in g.slices:
            key = (sl.module, sl.tensor, sl.dim)
            if key in seen:
                raise ValueError(f"pair_groups: {sl.name} dim {sl.dim} is in two of the paired groups")
            seen.add(key)
            slices.append(Slice(sl.module, sl.tensor, sl.dim, sl.idxs[order].reshape(n_joint, -1), sl.role))
        for k, lab in g.labels.items():
            if k in labels:
                raise ValueError(f"pair_groups: the paired groups share traced tensor {k}")
            labels[k] = remap[lab]
    joint = Group(tuple(slices), n_joint, slices[0], groups[0].graph, all(g.exact for g in groups),
                  tuple(sorted({r for g in groups for r in g.inexact_by})), 1, labels,
                  min(g.version for g in groups))
    return joint, joint_scores.to(torch.float32)
