"""Dependency rules for shape ops: view/reshape (shared atoms), permute, slices, cat/split, repeat (indexing
ops: ``rules_index.py``, registered with these).

    x[B, T, D] --view--> [B, T, H, hd]: D and (H, hd) are both mixed-radix numbers over atoms (H, hd),
    so a request on D is carried to whole heads (atom H) and back to every tensor that shares it.
"""

from __future__ import annotations

import numpy as np

from . import rules_index  # noqa: F401  (gather/index/scatter rules register with the shape ops)
from .rules import Ctx, _dim, refs, register_rule
from .trace import OpRecord, Ref


# ---------------------------------------------------------------- views and reshapes
def _atoms_for(sizes_a: list[int], sizes_b: list[int]) -> list[int] | None:
    """Common refinement of two factorizations of one number (outermost first), or None."""
    total = int(np.prod(sizes_a)) if sizes_a else 1
    bounds = {total, 1}
    for sizes in (sizes_a, sizes_b):
        acc = 1
        for s in reversed(sizes):
            acc *= s
            bounds.add(acc)
    b = sorted(bounds, reverse=True)
    if any(b[i] % b[i + 1] for i in range(len(b) - 1)):
        return None
    return [b[i] // b[i + 1] for i in range(len(b) - 1)]


def reshape_maps(g: Ctx, x: Ref | int, out: Ref | int, reason: str) -> None:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: split/merge dims through shared atoms.

    Dims are grouped into blocks of equal product (size-1 dims dropped); within a block both sides'
    dims are mixed-radix numbers over the common refinement ("atoms"). Example: (T, B*H, hd) ->
    (T*B, H*hd) has atoms (T, B, H, hd); a request on H*hd is carried to atom H (whole heads).
    """
    sa, sb = g.shape(x), g.shape(out)
    ia = [i for i, s in enumerate(sa) if s != 1]
    ib = [i for i, s in enumerate(sb) if s != 1]
    pa, pb = 0, 0
    while pa < len(ia) or pb < len(ib):
        if pa >= len(ia) or pb >= len(ib):
            break
        blk_a, blk_b = [ia[pa]], [ib[pb]]
        prod_a, prod_b = sa[ia[pa]], sb[ib[pb]]
        pa, pb = pa + 1, pb + 1
        while prod_a != prod_b:
            if prod_a < prod_b and pa < len(ia):
                blk_a.append(ia[pa])
                prod_a *= sa[ia[pa]]
                pa += 1
            elif prod_b < prod_a and pb < len(ib):
                blk_b.append(ib[pb])
                prod_b *= sb[ib[pb]]
                pb += 1
            else:
                break
        if prod_a != prod_b:
            g.block(x, ia, reason)
            g.block(out, ib, reason)
            return
        if len(blk_a) == 1 and len(blk_b) == 1:
            g.link(x, blk_a[0], out, blk_b[0])
            continue
        atoms = _atoms_for([sa[i] for i in blk_a], [sb[i] for i in blk_b])
        if atoms is None:
            g.block(x, blk_a, reason + " (dims do not nest)")
            g.block(out, blk_b, reason + " (dims do not nest)")
            continue
        keys = [g.edges.atom(s) for s in atoms]
        for t, blk, shape in ((x, blk_a, sa), (out, blk_b, sb)):
            ai = 0
            for d in blk:
                parts, acc = [], 1
                while acc < shape[d]:
                    parts.append((keys[ai], atoms[ai]))
                    acc *= atoms[ai]
                    ai += 1
                g.edges.split(g.key(t, d), parts)


@register_rule("aten.view", "aten._unsafe_view", "aten.reshape", "aten._reshape_alias", "aten.squeeze",
               "aten.unsqueeze", "aten.flatten", "aten.unflatten", "aten.view_copy", "aten.squeeze_copy",
               "aten.unsqueeze_copy", "aten._reshape_copy", "aten.reshape_as", "aten.view_as")
def _reshape(op: OpRecord, g: Ctx) -> None:
    reshape_maps(g, op.args[0], op.outputs[0], op.name)


@register_rule("aten.permute", "aten.permute_copy")
def _permute(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    r = len(g.shape(x))
    for i, d in enumerate(op.args[1]):
        g.link(x, _dim(d, r), out, i)


@register_rule("aten.transpose", "aten.swapaxes", "aten.swapdims", "aten.transpose_copy")
def _transpose(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    r = len(g.shape(x))
    d0, d1 = _dim(op.args[1], r), _dim(op.args[2], r)
    for i in range(r):
        j = d1 if i == d0 else d0 if i == d1 else i
        g.link(x, i, out, j)


@register_rule("aten.t", "aten.numpy_T", "aten.mT", "aten.t_copy")
def _t(op: OpRecord, g: Ctx) -> None:
    """t/numpy_T reverse the dims (<= 2-D for t); mT swaps the last two."""
    x, out = op.args[0], op.outputs[0]
    r = len(g.shape(x))
    perm = list(range(r))
    if op.name == "aten.mT" and r >= 2:
        perm[-2:] = [r - 1, r - 2]
    else:
        perm = perm[::-1]
    for i, d in enumerate(perm):
        g.link(x, d, out, i)


@register_rule("aten.expand", "aten.expand_copy", "aten.expand_as", "aten.broadcast_to")
def _expand(op: OpRecord, g: Ctx) -> None:
    """Expanded (1 -> n) and new leading dims are free; the others are identical."""
    g.broadcast(op.args[0], op.outputs[0])


@register_rule("aten.slice", "aten.slice_copy")
def _slice(op: OpRecord, g: Ctx) -> None:
    """out[i] = x[start + i*step] along dim; other dims identical."""
    x, out = op.args[0], op.outputs[0]
    sx = g.shape(x)
    d = _dim(op.get("dim", 0), len(sx))
    n = sx[d]
    start, end, step = op.get("start", 0), op.get("end", n), op.get("step", 1)
    start, end, _ = slice(start, end, step).indices(n)
    pos = np.arange(start, end, step)[: g.shape(out)[d]]
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i)
    if len(pos) == g.shape(out)[d] and len(pos):
        g.gather(out, d, x, d, pos)
    else:
        g.block(x, [d], f"{op.name} (unmapped)")


@register_rule("aten.narrow", "aten.narrow_copy")
def _narrow(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    sx = g.shape(x)
    d, start = _dim(op.args[1], len(sx)), op.args[2]
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i)
    g.gather(out, d, x, d, np.arange(g.shape(out)[d]) + int(start if isinstance(start, int) else 0))


@register_rule("aten.select", "aten.select_copy")
def _select(op: OpRecord, g: Ctx) -> None:
    """x.select(d, i): dim d is consumed at a fixed index (blocked); the others shift."""
    x, out = op.args[0], op.outputs[0]
    sx = g.shape(x)
    d = _dim(op.args[1], len(sx))
    g.block(x, [d], f"{op.name}(dim={d}) (reads one fixed position x[..., i, ...], which would move if the dim shrank)")
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i if i < d else i - 1)


@register_rule("aten.split", "aten.split_with_sizes", "aten.unsafe_split", "aten.unsafe_split_with_sizes",
               "aten.chunk", "aten.unsafe_chunk", "aten.tensor_split", "aten.split_copy",
               "aten.split_with_sizes_copy")
def _split(op: OpRecord, g: Ctx) -> None:
    """Consecutive ranges of dim d; other dims identical.

    ``chunk(n)`` and ``split(size)`` take their sizes from the tensor, so after pruning equal pieces
    stay equal only if each loses the same positions: position ``j`` of every equal piece is coupled
    (ShuffleNet's ``x.chunk(2)``, gates). Equal literal sizes get the same coupling: removing from them
    fails verification either way, so the coupling only makes the groups coarser, never wrong.
    """
    x = op.args[0]
    sx = g.shape(x)
    d = _dim(op.get("dim", 0), len(sx))
    off = 0
    for out in op.outputs:
        n = g.shape(out)[d]
        for i in range(len(sx)):
            if i != d:
                g.link(x, i, out, i)
        if n:
            g.gather(out, d, x, d, np.arange(off, off + n))
        off += n
    sizes = {g.shape(o)[d] for o in op.outputs}
    if len(op.outputs) > 1 and len(sizes) == 1:   # torch.export lowers chunk to split_with_sizes([n, n])
        for o in op.outputs[1:]:
            g.link(op.outputs[0], d, o, d)


@register_rule("aten.unbind", "aten.unbind_copy")
def _unbind(op: OpRecord, g: Ctx) -> None:
    x = op.args[0]
    sx = g.shape(x)
    d = _dim(op.get("dim", 0), len(sx))
    g.block(x, [d], f"{op.name}(dim={d}) (one output tensor per position: the code fixes this size)")
    for out in op.outputs:
        for i in range(len(sx)):
            if i != d:
                g.link(x, i, out, i if i < d else i - 1)


@register_rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(op: OpRecord, g: Ctx) -> None:
    """Each input is a range of the output along dim (offsets); other dims identical."""
    out = op.outputs[0]
    so = g.shape(out)
    d = _dim(op.get("dim", 0), len(so))
    off = 0
    for x in refs(op.args[:1]):
        sx = g.shape(x)
        if len(sx) != len(so):  # legacy empty tensors
            continue
        for i in range(len(so)):
            if i != d:
                g.link(x, i, out, i)
        if sx[d]:
            g.gather(x, d, out, d, np.arange(off, off + sx[d]))
        off += sx[d]


@register_rule("aten.stack")
def _stack(op: OpRecord, g: Ctx) -> None:
    out = op.outputs[0]
    so = g.shape(out)
    d = _dim(op.get("dim", 0), len(so))
    g.block(out, [d], f"{op.name}(dim={d})")
    for x in refs(op.args[:1]):
        for i in range(len(g.shape(x))):
            g.link(x, i, out, i if i < d else i + 1)


@register_rule("aten.repeat")
def _repeat(op: OpRecord, g: Ctx) -> None:
    """Tiling: out[j] = x[j % n] along each repeated dim (new leading dims are free)."""
    x, out = op.args[0], op.outputs[0]
    sx, so = g.shape(x), g.shape(out)
    lead = len(so) - len(sx)
    for i, n in enumerate(sx):
        if so[lead + i] == n:
            g.link(x, i, out, lead + i)
        elif n > 1:
            g.gather(out, lead + i, x, i, np.arange(so[lead + i]) % n)


@register_rule("aten.repeat_interleave")
def _repeat_interleave(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    reps = op.args[1] if len(op.args) > 1 else None
    if not isinstance(x, Ref) or not isinstance(reps, int) or op.get("dim") is None:
        for t in refs(op.args) + [Ref(o) for o in op.outputs]:
            g.block(t, None, f"{op.name} (tensor repeats)")
        return
    sx = g.shape(x)
    d = _dim(op.get("dim"), len(sx))
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i)
    g.gather(out, d, x, d, np.arange(g.shape(out)[d]) // reps)


@register_rule("aten.flip")
def _flip(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    sx = g.shape(x)
    dims = {_dim(d, len(sx)) for d in op.args[1]}
    for i, n in enumerate(sx):
        if i in dims:
            g.gather(out, i, x, i, np.arange(n)[::-1].copy())
        else:
            g.link(x, i, out, i)


@register_rule("aten.roll")
def _roll(op: OpRecord, g: Ctx) -> None:
    """Cyclic shift: a permutation of each rolled dim (Swin's shifted windows)."""
    x, out = op.args[0], op.outputs[0]
    sx = g.shape(x)
    shifts, dims = list(op.args[1]), list(op.get("dims", []))
    if not dims:
        g.block(x, None, "aten.roll (flattened)")
        g.block(out, None, "aten.roll (flattened)")
        return
    sh = {_dim(d, len(sx)): s for d, s in zip(dims, shifts, strict=True)}
    for i, n in enumerate(sx):
        if i in sh:
            g.gather(out, i, x, i, (np.arange(n) - sh[i]) % n)
        else:
            g.link(x, i, out, i)


@register_rule("aten.constant_pad_nd")
def _pad(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    sx = g.shape(x)
    pad = list(op.args[1])
    padded = {len(sx) - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0}
    for i in range(len(sx)):
        if i in padded:
            g.block(x, [i], "aten.constant_pad_nd (padded dim)")
            g.block(out, [i], "aten.constant_pad_nd (padded dim)")
        else:
            g.link(x, i, out, i)


@register_rule("aten.tril", "aten.triu")
def _tri(op: OpRecord, g: Ctx) -> None:
    x, out = op.args[0], op.outputs[0]
    r = len(g.shape(x))
    for i in range(r):
        if i >= r - 2:
            g.block(x, [i], f"{op.name} (position-dependent)")
            g.block(out, [i], f"{op.name} (position-dependent)")
        else:
            g.link(x, i, out, i)


@register_rule("aten.pixel_shuffle", "aten.pixel_unshuffle")
def _pixel_shuffle(op: OpRecord, g: Ctx) -> None:
    """pixel_shuffle: channel c of the output is input channels [c*r^2, (c+1)*r^2)."""
    x, out = op.args[0], op.outputs[0]
    sx, so = g.shape(x), g.shape(out)
    c = len(sx) - 3
    for i in range(c):
        g.link(x, i, out, i)
    if op.name == "aten.pixel_shuffle":
        g.gather(x, c, out, c, np.arange(sx[c]) // (sx[c] // so[c]))
    else:
        g.gather(out, c, x, c, np.arange(so[c]) // (so[c] // sx[c]))
    g.block(x, [c + 1, c + 2], op.name)
    g.block(out, [c + 1, c + 2], op.name)


@register_rule("aten.as_strided", "aten.as_strided_copy")
def _as_strided(op: OpRecord, g: Ctx) -> None:
    """Only a re-stride of the same sizes to contiguous strides (size-1 dims aside) is an identity;
    anything else re-reads memory in a way no index map describes, so it blocks."""
    x, out = op.args[0], op.outputs[0]
    size, stride = list(op.args[1]), list(op.args[2])
    offset = op.get("storage_offset", 0) or 0
    contiguous, acc = [], 1
    for n in reversed(size):
        contiguous.append(acc)
        acc *= n
    contiguous.reverse()
    same = tuple(size) == g.shape(x) and not offset and all(
        n == 1 or s == c for n, s, c in zip(size, stride, contiguous, strict=True))
    if same:
        g.same(x, out)
        return
    g.block(x, None, f"{op.name} (re-strided memory)")
    g.block(out, None, f"{op.name} (re-strided memory)")


@register_rule("brainsurgeon.write_into_view")
def _write_into_view(op: OpRecord, g: Ctx) -> None:
    """An in-place write into a view (``b = a.clone(); b[n:2n].zero_()``): the base keeps its positions.

    The view's positions are already mapped to the base's by the op that made the view (slice, select,
    reshape), and the written values to the view by the writing op, so the new base is the old one, dim
    for dim. Hard-coded view bounds (``b[:64]``) are caught by verification, as everywhere.
    """
    g.same(op.args[0], op.outputs[0])
