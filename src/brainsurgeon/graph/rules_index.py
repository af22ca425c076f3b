"""Dependency rules for indexing ops: index_select, advanced indexing, index_put, gather and scatter.

An indexing op reads (or writes) positions of one dim at *values* of an index tensor. Every other dim
passes through unchanged, so it is coupled as an identity; the indexed dim of the tensor that is read is
blocked unless the index values are one known 1-D list (then it is a gather map). Example, DeBERTa's
relative attention (``c2p[b*h, i, j] = scores[b*h, i, pos[b*h, i, j]]``)::

    scores [B*H, T, 2S] --gather(dim=-1, pos)--> c2p [B*H, T, T]
    dim 0 (heads): identity to c2p and to pos (an expand: free), so heads stay prunable;
    dim 2 (relative positions): blocked, its positions are chosen by pos's values.
"""

from __future__ import annotations

import numpy as np
import torch

from .rules import Ctx, _dim, refs, register_rule
from .trace import OpRecord, Ref


def _prefix(g: Ctx, short: Ref | int, long: Ref | int, d: int) -> None:
    """``short`` reads positions ``0..n-1`` of ``long`` along ``d`` (gather/scatter allow a smaller index)."""
    n, m = g.shape(short)[d], g.shape(long)[d]
    if n == m:
        g.link(short, d, long, d)
    elif n:
        g.gather(short, d, long, d, np.arange(n))


@register_rule("aten.index_select")
def _index_select(op: OpRecord, g: Ctx) -> None:
    x, idx, out = op.args[0], op.args[2], op.outputs[0]
    sx = g.shape(x)
    d = _dim(op.args[1], len(sx))
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i)
    v = g.value(idx)
    if v is None:
        g.block(x, [d], f"{op.name} (index values unknown)")
        g.block(out, [d], f"{op.name} (index values unknown)")
    else:
        g.gather(out, d, x, d, v.reshape(-1))


def _trailing(g: Ctx, x: Ref, y: Ref | int, used: list[int], why: str) -> bool:
    """Indices on the leading dims only (``x[rows]``, MoE token routing): the dims after them pass through
    unchanged (linked right-aligned), the indexed ones block. False when the shapes do not fit that."""
    sx, sy = g.shape(x), g.shape(y)
    k = len(used)
    rest = len(sx) - k
    if used != list(range(k)) or rest <= 0 or len(sy) < rest or tuple(sy[len(sy) - rest:]) != tuple(sx[k:]):
        return False
    for j in range(1, rest + 1):
        g.link(x, -j, y, -j)
    g.block(x, list(range(k)), why)
    g.block(y, list(range(len(sy) - rest)), why)
    return True


def _covered(g: Ctx, indices: list) -> list[tuple[int, Ref | None]]:
    """``(dim of x, index)`` for every dim an index list covers: ``None`` entries skip a dim, a boolean mask of
    rank k covers k dims (``x[mask]`` with ``mask`` of shape ``x.shape[:2]``), an integer index one."""
    out: list[tuple[int, Ref | None]] = []
    d = 0
    for t in indices:
        if t is None:
            d += 1
            continue
        k = len(g.shape(t)) if g.nodes[t.node].dtype == torch.bool else 1
        out += [(d + j, t) for j in range(k)]
        d += k
    return out


@register_rule("aten.index_put", "aten.index_put_", "aten._index_put_impl_", "aten._unsafe_index_put")
def _index_put(op: OpRecord, g: Ctx) -> None:
    """self[indices] = values: the output is self; values' trailing dims are self's dims after the indexed ones
    (right-aligned, broadcast). A boolean mask is elementwise over the dims it covers: ``x[mask] = v`` with a
    broadcast ``v`` couples the mask's dims to ``x``'s (wav2vec2's ``h[mask_time] = masked_spec_embed``);
    integer indices, or values with one row per selected element, block the indexed dims."""
    x, indices, vals, out = op.args[0], op.args[1], op.args[2], op.outputs[0]
    cov = _covered(g, indices)
    used = [d for d, _ in cov]
    g.same(x, out)
    why = f"{op.name} (indexed dims: positions written at an index tensor's values cannot shrink; prune the other dims)"
    sx = g.shape(x)
    sv = g.shape(vals) if isinstance(vals, Ref) else ()
    rest = len(sx) - len(used)
    prefix = used == list(range(len(used)))
    if (any(n > 1 for n in sv) and not prefix) or any(   # values that do not broadcast to x's trailing dims
            b != a and b != 1 for a, b in zip(sx[len(used):][::-1], sv[::-1], strict=False)):
        for t in refs(indices) + refs([x, vals]):
            g.block(t, None, why)
        return
    if prefix:
        for j in range(1, min(rest, len(sv)) + 1):
            g.link(x, -j, vals, -j)
    per_element = prefix and len(sv) > rest and any(n > 1 for n in sv[:len(sv) - rest])   # a row per element
    if per_element:
        g.block(vals, list(range(len(sv) - rest)), why)
    masks = {}
    for d, t in cov:
        if per_element or g.nodes[t.node].dtype != torch.bool:
            g.block(x, [d], why)
            g.block(t, None, why)
        else:
            masks.setdefault(t, []).append(d)
    for t, dims in masks.items():   # a broadcast value through a boolean mask: elementwise over its dims
        for j, d in enumerate(dims):
            g.link(t, j, x, d)


@register_rule("aten.index", "aten._unsafe_index")
def _index(op: OpRecord, g: Ctx) -> None:
    """x[..., idx, ...] with one 1-D integer index: a gather along that dim; anything else blocks."""
    x, out = op.args[0], op.outputs[0]
    indices = op.args[1]
    sx, so = g.shape(x), g.shape(out)
    used = [i for i, t in enumerate(indices) if t is not None]
    v = g.value(indices[used[0]]) if len(used) == 1 else None
    covered = [d for d, _ in _covered(g, indices)]
    if v is not None and v.dtype == bool:
        v = np.nonzero(v.reshape(-1))[0] if v.ndim == 1 else None
    if v is None or v.ndim != 1 or len(so) != len(sx):
        why = f"{op.name} (advanced indexing: positions read at an index tensor's values cannot shrink)"
        if _trailing(g, x, out, covered, why):
            for t in refs(indices):
                g.block(t, None, why)
            return
        for t in refs([x]) + refs(indices):
            g.block(t, None, why)
        g.block(out, None, why)
        return
    d = used[0]
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i)
    g.gather(out, d, x, d, v.astype(np.int64) % sx[d])


def _indexed_dim(op: OpRecord, g: Ctx, x: Ref) -> tuple[int, str]:
    d = _dim(op.get("dim", 0), len(g.shape(x)))
    return d, (f"{op.name}(dim={d}) (positions chosen by the values of an index tensor: this dim cannot shrink; "
               "prune the other dims, or ignore the module that owns it)")


@register_rule("aten.gather")
def _gather(op: OpRecord, g: Ctx) -> None:
    """``out[i][j] = x[i][idx[i][j]]`` (dim=1): ``out`` has ``idx``'s shape, every dim identical to
    ``idx``'s; the other dims read ``x``'s positions ``0..n-1`` (``idx`` may be smaller there); ``x``'s
    gathered dim is read at data-dependent positions, so it blocks."""
    x, idx, out = op.args[0], op.args[2], op.outputs[0]
    if not g.shape(x):
        return
    d, why = _indexed_dim(op, g, x)
    for i in range(len(g.shape(out))):
        g.link(idx, i, out, i)
        if i != d:
            _prefix(g, out, x, i)
    g.block(x, [d], why)


@register_rule("aten.scatter", "aten.scatter_add", "aten.scatter_reduce")
def _scatter(op: OpRecord, g: Ctx) -> None:
    """``out = x; out[i][idx[i][j]] = src[i][j]`` (dim=1): ``out`` is ``x``; ``idx`` reads ``src``'s and
    writes ``x``'s positions ``0..n-1`` on every other dim; ``x``'s scattered dim is written at
    data-dependent positions, so it blocks (a scalar ``src`` couples nothing)."""
    x, idx, out = op.args[0], op.args[2], op.outputs[0]
    g.same(x, out)
    if not g.shape(x):
        return
    d, why = _indexed_dim(op, g, x)
    src = op.get("src")
    for i in range(len(g.shape(idx))):
        if isinstance(src, Ref) and len(g.shape(src)) == len(g.shape(idx)):
            _prefix(g, idx, src, i)
        if i != d:
            _prefix(g, idx, x, i)
    g.block(x, [d], why)
    g.block(out, [d], why)


@register_rule("aten.index_add", "aten.index_copy", "aten.index_reduce", "aten.index_fill")
def _index_write(op: OpRecord, g: Ctx) -> None:
    """``out = x; out[..., idx[k], ...] (+)= src[..., k, ...]`` along ``dim`` (GNN message aggregation,
    ``index_add_(0, dst, msg)``): ``src``'s other dims are ``x``'s; ``src``'s dim is the 1-D ``idx``;
    ``x``'s indexed dim is written at data-dependent positions, so it blocks."""
    x, out = op.args[0], op.outputs[0]
    g.same(x, out)
    if not g.shape(x):
        return
    d, why = _indexed_dim(op, g, x)
    idx = op.get("index")
    src = op.get("source")
    if isinstance(src, Ref) and len(g.shape(src)) == len(g.shape(x)):
        for i in range(len(g.shape(x))):
            if i != d:
                g.link(src, i, x, i)
        if isinstance(idx, Ref) and len(g.shape(idx)) == 1:
            g.link(src, d, idx, 0)
    g.block(x, [d], why)
    g.block(out, [d], why)
