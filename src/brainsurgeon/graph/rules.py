"""The registry of per-op dependency rules, and the rules for shape ops (elementwise, views, cat, slices).

A rule reads one recorded op and connects the (tensor, dim) keys of its inputs and outputs with
index maps (see ``maps.py``), or blocks dims whose indices it cannot map. An op with no rule blocks
every dim of its tensors — never guessed::

    @register_rule("aten.flip")
    def _flip(op, g):                      # out[i] = x[n - 1 - i] along each flipped dim
        x, out = op.args[0], op.outputs[0]
        ...

Look-ups fall back from an in-place name to its functional one (``aten.add_`` -> ``aten.add``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .maps import Edges, Key
from .trace import Node, OpRecord, Ref

Rule = Callable[[OpRecord, "Ctx"], None]
_RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: use the function as the dependency rule of the ATen ops ``names`` ('aten.add', ...)."""
    def deco(fn: Rule) -> Rule:
        for n in names:
            _RULES[n] = fn
        return fn
    return deco


def find_rule(name: str) -> Rule | None:
    """The rule for op ``name`` (overload packet), falling back from in-place ``x_`` to ``x``."""
    rule = _RULES.get(name)
    if rule is None and name.endswith("_") and not name.endswith("__"):
        rule = _RULES.get(name[:-1])
    return rule


def registered_rules() -> list[str]:
    """Names of every op with a rule."""
    return sorted(_RULES)


class Ctx:
    """What a rule sees: node shapes and the edge builder, with dim normalisation."""

    def __init__(self, edges: Edges, nodes: dict[int, Node]) -> None:
        self.edges = edges
        self.nodes = nodes

    def shape(self, x: Ref | int) -> tuple[int, ...]:
        return self.nodes[x.node if isinstance(x, Ref) else x].shape

    def value(self, x: Ref | int) -> np.ndarray | None:
        return self.nodes[x.node if isinstance(x, Ref) else x].value

    def key(self, x: Ref | int, dim: int) -> Key:
        nid = x.node if isinstance(x, Ref) else x
        shape = self.nodes[nid].shape
        d = dim + len(shape) if dim < 0 else dim
        k = (nid, d)
        self.edges._add(k, shape[d])
        return k

    def link(self, a: Ref | int, da: int, b: Ref | int, db: int) -> None:
        self.edges.link(self.key(a, da), self.key(b, db))

    def gather(self, a: Ref | int, da: int, b: Ref | int, db: int, pos: np.ndarray) -> None:
        self.edges.gather(self.key(a, da), self.key(b, db), pos)

    def block(self, x: Ref | int, dims: Iterable[int] | None, reason: str) -> None:
        shape = self.shape(x)
        for d in range(len(shape)) if dims is None else dims:
            self.edges.block(self.key(x, d), reason)

    def inexact(self, x: Ref | int, d: int, reason: str) -> None:
        self.edges.mark_inexact(self.key(x, d), reason)

    def broadcast(self, src: Ref | int, out: Ref | int) -> None:
        """Right-aligned broadcasting: equal-size dims are identical, size-1 dims are free."""
        s, o = self.shape(src), self.shape(out)
        for i in range(1, min(len(s), len(o)) + 1):
            if s[-i] == o[-i] and s[-i] > 1:
                self.link(src, len(s) - i, out, len(o) - i)

    def same(self, a: Ref | int, b: Ref | int) -> None:
        """Link every dim of two equally-shaped tensors."""
        if self.shape(a) == self.shape(b):
            for d in range(len(self.shape(a))):
                self.link(a, d, b, d)


def refs(values: Iterable[object]) -> list[Ref]:
    """The tensor arguments among ``values`` (one level of lists flattened)."""
    out: list[Ref] = []
    for v in values:
        if isinstance(v, Ref):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, Ref))
    return out


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---------------------------------------------------------------- elementwise and friends
ELEMENTWISE = """abs acos acosh add addcdiv addcmul alias asin asinh atan atan2 atanh bitwise_and bitwise_not
bitwise_or bitwise_xor bernoulli ceil celu clamp clamp_max clamp_min clip clone copy cos cosh detach div elu eq erf
erfc erfinv exp exp2 expm1 fill floor floor_divide fmod frac ge gelu gt hardshrink hardsigmoid hardswish hardtanh
isfinite isinf isnan le leaky_relu lerp lift_fresh lift_fresh_copy log log10 log1p log2 log_sigmoid_forward
logical_and logical_not logical_or logical_xor logit lt masked_fill maximum minimum mish mul nan_to_num ne neg
native_dropout normal pow reciprocal relu remainder round rrelu_with_noise rsqrt rsub selu sgn sigmoid sign silu
sin sinh softplus softshrink sqrt square sub tan tanh threshold trunc uniform where xlogy zero _to_copy
bitwise_left_shift bitwise_right_shift float_power heaviside hypot copysign nextafter i0 sinc deg2rad rad2deg
positive conj resolve_conj resolve_neg empty_like zeros_like ones_like full_like rand_like randn_like
randint_like dropout feature_dropout alpha_dropout _conj detach_ contiguous _log_softmax_backward_data
""".split()


@register_rule(*[f"aten.{n}" for n in ELEMENTWISE])
def _elementwise(op: OpRecord, g: Ctx) -> None:
    """Elementwise with broadcasting: every input dim of the output's size is that output dim."""
    ins = refs(op.args)
    for out in op.outputs:
        for x in ins:
            g.broadcast(x, out)
    if op.name == "aten.where" and len(ins) == 1:  # where(cond) = nonzero: data-dependent
        g.block(ins[0], None, "aten.where(cond) (data-dependent)")
        for out in op.outputs:
            g.block(out, None, "aten.where(cond) (data-dependent)")


FACTORIES = """zeros ones full empty empty_strided scalar_tensor rand randn randint randperm new_zeros new_ones
new_full new_empty new_empty_strided zeros_like_ empty_permuted""".split()


@register_rule(*[f"aten.{n}" for n in FACTORIES])
def _factory(op: OpRecord, g: Ctx) -> None:
    """Constant-content tensors: their dims are free (sizes come from the caller's code)."""


@register_rule("aten._assert_async", "aten._assert_scalar", "aten._assert_tensor_metadata",
               "aten.record_stream", "aten._functional_assert_async", "aten.sym_constrain_range_for_size")
def _no_effect(op: OpRecord, g: Ctx) -> None:
    """Checks with no tensor result."""


@register_rule("aten.arange", "aten.linspace", "aten.logspace", "aten.eye")
def _position_dependent_factory(op: OpRecord, g: Ctx) -> None:
    for out in op.outputs:
        g.block(out, None, f"{op.name} (values depend on positions)")


@register_rule("aten._prelu_kernel", "aten.prelu")
def _prelu(op: OpRecord, g: Ctx) -> None:
    x, w = op.args[0], op.args[1]
    out = op.outputs[0]
    g.same(x, out)
    if len(g.shape(w)) == 1 and g.shape(w)[0] > 1 and len(g.shape(x)) >= 2:
        g.link(w, 0, x, 1)


@register_rule("aten.glu")
def _glu(op: OpRecord, g: Ctx) -> None:
    """glu(x, dim): out[j] = x[j] * sigmoid(x[j + n]); both halves map to j."""
    x, out = op.args[0], op.outputs[0]
    d = _dim(op.get("dim", -1), len(g.shape(x)))
    n = g.shape(out)[d]
    for i in range(len(g.shape(x))):
        if i != d:
            g.link(x, i, out, i)
    g.gather(x, d, out, d, np.arange(2 * n) % n)


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
    g.block(x, [d], f"{op.name}(dim={d}) (fixed index)")
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i if i < d else i - 1)


@register_rule("aten.split", "aten.split_with_sizes", "aten.unsafe_split", "aten.unsafe_split_with_sizes",
               "aten.chunk", "aten.unsafe_chunk", "aten.tensor_split", "aten.split_copy",
               "aten.split_with_sizes_copy")
def _split(op: OpRecord, g: Ctx) -> None:
    """Consecutive ranges of dim d; other dims identical."""
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


@register_rule("aten.unbind", "aten.unbind_copy")
def _unbind(op: OpRecord, g: Ctx) -> None:
    x = op.args[0]
    sx = g.shape(x)
    d = _dim(op.get("dim", 0), len(sx))
    g.block(x, [d], f"{op.name}(dim={d})")
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


@register_rule("aten.index", "aten._unsafe_index")
def _index(op: OpRecord, g: Ctx) -> None:
    """x[..., idx, ...] with one 1-D integer index: a gather along that dim; anything else blocks."""
    x, out = op.args[0], op.outputs[0]
    indices = op.args[1]
    sx, so = g.shape(x), g.shape(out)
    used = [i for i, t in enumerate(indices) if t is not None]
    v = g.value(indices[used[0]]) if len(used) == 1 else None
    if v is not None and v.dtype == bool:
        v = np.nonzero(v.reshape(-1))[0] if v.ndim == 1 else None
    if v is None or v.ndim != 1 or len(so) != len(sx):
        for t in refs([x]) + refs(indices):
            g.block(t, None, f"{op.name} (advanced indexing)")
        g.block(out, None, f"{op.name} (advanced indexing)")
        return
    d = used[0]
    for i in range(len(sx)):
        if i != d:
            g.link(x, i, out, i)
    g.gather(out, d, x, d, v.astype(np.int64) % sx[d])


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
