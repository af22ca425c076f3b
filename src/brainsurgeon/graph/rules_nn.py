"""Dependency rules for compute ops: matmul family, convolution (grouped/depthwise), norms, embedding,
pooling/resampling, reductions, softmax, attention (SDPA) and fused RNN layers.

Contractions couple their reduced dims (``mm``: ``a[:, k]`` with ``b[k, :]``): removing a zeroed ``k``
leaves the product unchanged. Spatial dims of convolutions and pooling are blocked (no index map).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .rules import Ctx, _dim, refs, register_module_rule, register_rule
from .surgery import class_fixer, register_named_fixer
from .trace import OpRecord, Ref


def _mm(g: Ctx, a: Ref, b: Ref, out: int) -> None:
    """a[..., n, k] @ b[..., k, m] -> out[..., n, m] (leading dims broadcast)."""
    sa, sb, so = g.shape(a), g.shape(b), g.shape(out)
    if len(sa) == 1 or len(sb) == 1:
        if len(sa) == 1 and len(sb) == 1:
            g.link(a, 0, b, 0)
        elif len(sb) == 1:            # mv: a[n, k] @ v[k]
            g.link(a, -1, b, 0)
            g.link(a, -2, out, -1)
        else:                         # v[k] @ b[k, m]
            g.link(a, 0, b, -2)
            g.link(b, -1, out, -1)
        return
    g.link(a, -1, b, -2)
    g.link(a, -2, out, -2)
    g.link(b, -1, out, -1)
    for t in (a, b):
        st = g.shape(t)
        for i in range(3, min(len(st), len(so)) + 1):
            if st[-i] == so[-i]:
                g.link(t, len(st) - i, out, len(so) - i)


@register_rule("aten.mm", "aten.bmm", "aten.matmul", "aten.mv", "aten.dot", "aten.vdot", "aten.inner")
def _matmul(op: OpRecord, g: Ctx) -> None:
    a, b = refs(op.args)[:2]
    _mm(g, a, b, op.outputs[0])


@register_rule("aten.addmm", "aten.baddbmm", "aten.addmv", "aten.addbmm")
def _addmm(op: OpRecord, g: Ctx) -> None:
    bias, a, b = refs(op.args)[:3]
    _mm(g, a, b, op.outputs[0])
    g.broadcast(bias, op.outputs[0])


@register_rule("aten._grouped_mm")
def _grouped_mm(op: OpRecord, g: Ctx) -> None:
    """MoE experts: a[T, k] with b[E, k, n] (rows of a split over experts by ``offs``) -> out[T, n]; a[E, T, k]
    with b[E, k, n] is a batched mm. The expert dim of b is not a channel dim: it blocks."""
    a, b = op.args[0], op.args[1]
    out = op.outputs[0]
    sa, sb = g.shape(a), g.shape(b)
    if len(sb) != 3 or len(sa) not in (2, 3):
        g.block(a, None, "aten._grouped_mm (layout)")
        g.block(b, None, "aten._grouped_mm (layout)")
        g.block(out, None, "aten._grouped_mm (layout)")
        return
    g.link(a, -1, b, 1)
    g.link(b, 2, out, -1)
    g.link(a, -2, out, -2)
    if len(sa) == 3:
        g.link(a, 0, b, 0)
        g.link(b, 0, out, 0)
    g.block(b, [0], "aten._grouped_mm (expert dim)")


@register_rule("aten.linear")
def _linear(op: OpRecord, g: Ctx) -> None:
    """linear(x[..., k], w[n, k], b[n]) -> out[..., n]."""
    x, w = op.args[0], op.args[1]
    out = op.outputs[0]
    g.link(x, -1, w, 1)
    g.link(w, 0, out, -1)
    for i in range(len(g.shape(x)) - 1):
        g.link(x, i, out, i)
    if isinstance(op.args[2], Ref):
        g.broadcast(op.args[2], out)


def _pointwise(op: OpRecord, i: int, sw: tuple[int, ...], transposed: bool) -> bool:
    """Whether spatial dim ``i`` of a convolution maps input position p to output position p."""
    def at(name: str, default: int) -> int:
        v = op.get(name, None)
        v = [default] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]
        return int(v[i] if i < len(v) else v[-1]) if v else default
    if transposed or sw[2 + i] != 1 or isinstance(op.get("padding", 0), str):
        return False
    return at("stride", 1) == 1 and at("padding", 0) == 0


@register_rule("aten.convolution", "aten._convolution", "aten.conv2d", "aten.conv1d", "aten.conv3d",
               "aten.cudnn_convolution", "aten.mkldnn_convolution", "aten._convolution_mode",
               "aten.conv_transpose2d", "aten.cudnn_convolution_transpose", "aten._conv_depthwise2d",
               "aten.conv_depthwise3d", "aten.slow_conv2d_forward", "aten._slow_conv2d_forward",
               "aten.thnn_conv2d", "aten.slow_conv_transpose2d", "aten.miopen_convolution")
def _conv(op: OpRecord, g: Ctx) -> None:
    """Channels through weight [O, I/g, k...] (transposed: [I, O/g, k...]); groups via shared atoms.

    With ``groups > 1`` the input channels are atoms (G, I/g) and the output channels (G, O/g): the
    group atom G is shared, so a request is carried to whole conv groups (depthwise: channel c of the
    input is output channels [c*m, (c+1)*m)) or to one position in every group.
    """
    x, w = op.args[0], op.args[1]
    b = op.args[2] if isinstance(op.args[2], Ref) else None
    out = op.outputs[0]
    transposed = bool(op.get("transposed", False)) or "transpose" in op.name
    groups = int(op.get("groups", 1) or 1)
    sx, sw, so = g.shape(x), g.shape(w), g.shape(out)
    batched = len(sx) == len(sw)
    cx, co = (1, 1) if batched else (0, 0)
    if batched:
        g.link(x, 0, out, 0)
    for i in range(len(sx) - cx - 1):   # a 1-wide kernel, stride 1, no padding: positions map one to one
        if _pointwise(op, i, sw, transposed):
            g.link(x, cx + 1 + i, out, co + 1 + i)
        else:
            g.block(x, [cx + 1 + i], f"{op.name} (spatial)")
            g.block(out, [co + 1 + i], f"{op.name} (spatial)")
    g.block(w, range(2, len(sw)), f"{op.name} (kernel)")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    if b is not None:
        g.link(b, 0, out, co)
    if groups == 1:
        g.link(x, cx, w, w_in)
        g.link(out, co, w, w_out)
        return
    cin, cout = sx[cx], so[co]
    e = g.edges
    ga = e.atom(groups)
    ig = e.atom(cin // groups)
    og = e.atom(cout // groups)
    e.split(g.key(x, cx), [(ga, groups), (ig, cin // groups)])
    e.split(g.key(out, co), [(ga, groups), (og, cout // groups)])
    if transposed:   # weight [I, O/g]: dim0 is the input channels, dim1 the position within a group
        g.link(x, cx, w, 0)
        e.link(g.key(w, 1), og)
    else:            # weight [O, I/g]
        g.link(out, co, w, 0)
        e.link(g.key(w, 1), ig)


def _channel_norm(op: OpRecord, g: Ctx, reason: str) -> None:
    """BatchNorm-style: per-channel (dim 1) vectors; every other dim is elementwise."""
    x = op.args[0]
    out = op.outputs[0]
    g.same(x, out)
    sx = g.shape(x)
    if len(sx) < 2:
        return
    c = sx[1]
    g.module_attr(op, "num_features", x, [1])   # InstanceNorm without affine/stats: (1, N*C) scales with C
    for t in refs(op.args[1:]) + [Ref(o) for o in op.outputs[1:]]:
        st = g.shape(t)
        if len(st) == 1 and st[0] == c:
            g.link(t, 0, x, 1)


@register_rule("aten.native_batch_norm", "aten._native_batch_norm_legit", "aten.batch_norm",
               "aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit_functional",
               "aten.cudnn_batch_norm", "aten.miopen_batch_norm", "aten._batch_norm_impl_index",
               "aten._batch_norm_with_update", "aten._batch_norm_no_update",
               "aten._batch_norm_with_update_functional", "aten.native_batch_norm_legit")
def _batch_norm(op: OpRecord, g: Ctx) -> None:
    _channel_norm(op, g, op.name)


@register_rule("aten.native_layer_norm", "aten.layer_norm", "aten._fused_rms_norm", "aten.rms_norm")
def _layer_norm(op: OpRecord, g: Ctx) -> None:
    """Normalized (trailing) dims are coupled to the affine vectors; statistics make them inexact."""
    x, shape = op.args[0], op.args[1]
    out = op.outputs[0]
    sx = g.shape(x)
    k = len(shape)
    g.same(x, out)
    for t in refs(op.args[2:]):
        st = g.shape(t)
        for i in range(1, min(k, len(st)) + 1):
            g.link(t, len(st) - i, x, len(sx) - i)
    for i in range(len(sx) - k, len(sx)):
        g.inexact(x, i, f"{op.name} (statistics over the normalized dims)")
    g.module_attr(op, "normalized_shape", x, range(len(sx) - k, len(sx)))
    for o in op.outputs[1:]:
        so = g.shape(o)
        for i in range(min(len(so), len(sx) - k)):
            if so[i] == sx[i]:
                g.link(o, i, x, i)


@register_rule("aten.native_group_norm", "aten.group_norm")
def _group_norm(op: OpRecord, g: Ctx) -> None:
    """Channels are atoms (G, C/G): whole groups are exact; a position in every group is inexact."""
    x = op.args[0]
    out = op.outputs[0]
    sx = g.shape(x)
    g.same(x, out)
    groups = int(op.get("group", op.get("num_groups", 1)))
    c = sx[1]
    for t in refs(op.args[1:3]):
        g.link(t, 0, x, 1)
    g.module_attr(op, "num_channels", x, [1])
    if len(op.outputs) > 1 and g.shape(op.outputs[1])[-1] == groups:
        g.module_attr(op, "num_groups", op.outputs[1], [-1])
    if groups > 1 and c > groups:
        e = g.edges
        ga, pa = e.atom(groups), e.atom(c // groups)
        e.split(g.key(x, 1), [(ga, groups), (pa, c // groups)])
        e.mark_inexact(pa, f"{op.name} (channels within a group)")
        for o in op.outputs[1:]:
            if g.shape(o)[-1] == groups:
                e.link(g.key(o, -1), ga)
    elif groups == 1:
        g.inexact(x, 1, f"{op.name} (one group)")


@register_rule("aten._weight_norm_interface", "aten._weight_norm")
def _weight_norm(op: OpRecord, g: Ctx) -> None:
    """``w = g * v / ||v||`` (norm over every dim but ``dim``; wav2vec2's positional conv): ``w`` is ``v`` dim for
    dim, ``g`` and the norms share ``v``'s ``dim``, the norm's dims are inexact. Only for
    ``nn.utils.parametrizations.weight_norm`` (surgery resizes the parametrized module, :func:`_parametrized_fix`);
    the hook-based ``nn.utils.weight_norm`` keeps a stale ``weight`` attribute, so its dims block with a note."""
    v, gain = op.args[0], op.args[1]
    owner = g.nodes[v.node].owner if isinstance(v, Ref) else None
    if owner is None or ".parametrizations." not in f".{owner[0]}.":
        why = (f"{op.name} (hook-based weight norm: its module cannot be resized; use "
               "torch.nn.utils.parametrizations.weight_norm, or remove_weight_norm before pruning)")
        for t in refs(op.args) + list(op.outputs):
            g.block(t, None, why)
        return
    sv = g.shape(v)
    d = _dim(op.get("dim", 0), len(sv))
    for out in op.outputs:
        g.broadcast(v, out)
    g.broadcast(gain, v)
    for i in range(len(sv)):
        if i != d:
            g.inexact(v, i, f"{op.name} (the weight norm is taken over this dim)")


_PARAMETRIZED = [f"torch.nn.utils.parametrize.Parametrized{c}" for c in
                 ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")]


@register_named_fixer(*_PARAMETRIZED, container=True)
def _parametrized_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """A module under ``torch.nn.utils.parametrize`` (weight norm): the removals of an ``original`` shaped like the
    tensor it parametrizes are that tensor's, for the fixer of the module's own class (conv ``groups``, widths)."""
    inner: dict[str, dict[int, np.ndarray]] = {}
    for key, dims in removed.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "parametrizations":
            if tuple(getattr(m.parametrizations[parts[1]], parts[2]).shape) == tuple(getattr(m, parts[1]).shape):
                inner.setdefault(parts[1], {}).update(dims)
        elif len(parts) == 1:
            inner.setdefault(key, {}).update(dims)
    fixer = class_fixer(type(m).__mro__[1])   # the wrapped class's (Conv1d, Linear, ...): parametrize subclasses it
    if fixer is not None:
        fixer(m, inner)


@register_rule("aten.embedding")
def _embedding(op: OpRecord, g: Ctx) -> None:
    """embedding(w[V, D], idx[...]) -> out[..., D]: D coupled; vocabulary rows are indexed (blocked)."""
    w, idx = op.args[0], op.args[1]
    out = op.outputs[0]
    g.link(w, 1, out, -1)
    g.block(w, [0], "aten.embedding (vocabulary rows are looked up by index)")
    for i in range(len(g.shape(idx))):
        g.link(idx, i, out, i)


def _spatial_rank(op: OpRecord, rank: int) -> int:
    for d in (1, 2, 3):
        if f"{d}d" in op.name:
            return d
    return max(rank - 2, 1)


@register_rule("aten.max_pool2d_with_indices", "aten.max_pool2d", "aten.max_pool1d", "aten.max_pool3d",
               "aten.max_pool3d_with_indices", "aten.avg_pool1d", "aten.avg_pool2d", "aten.avg_pool3d",
               "aten.adaptive_avg_pool1d", "aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool3d",
               "aten._adaptive_avg_pool2d", "aten._adaptive_avg_pool3d", "aten.adaptive_max_pool1d",
               "aten.adaptive_max_pool2d", "aten.adaptive_max_pool3d", "aten.upsample_nearest1d",
               "aten.upsample_nearest2d", "aten.upsample_nearest3d", "aten.upsample_bilinear2d",
               "aten.upsample_bicubic2d", "aten.upsample_linear1d", "aten.upsample_trilinear3d",
               "aten._upsample_nearest_exact1d", "aten._upsample_nearest_exact2d",
               "aten._upsample_nearest_exact3d", "aten._upsample_bilinear2d_aa", "aten._upsample_bicubic2d_aa",
               "aten.reflection_pad1d", "aten.reflection_pad2d", "aten.reflection_pad3d",
               "aten.replication_pad1d", "aten.replication_pad2d", "aten.replication_pad3d",
               "aten.fractional_max_pool2d", "aten.lp_pool2d", "aten.grid_sampler_2d", "aten.grid_sampler")
def _spatial(op: OpRecord, g: Ctx) -> None:
    """Pooling/resampling/padding: batch and channel dims pass through; spatial dims are blocked."""
    x = op.args[0]
    sx = g.shape(x)
    sr = _spatial_rank(op, len(sx))
    lead = len(sx) - sr
    g.block(x, range(lead, len(sx)), f"{op.name} (spatial)")
    for o in op.outputs:
        so = g.shape(o)
        for i in range(min(lead, len(so))):
            if so[i] == sx[i]:
                g.link(x, i, o, i)
        g.block(o, range(lead, len(so)), f"{op.name} (spatial)")
    if "grid_sampler" in op.name:
        grid = op.args[1]
        g.block(grid, None, f"{op.name} (grid)")


_EXACT_REDUCE = {"aten.sum", "aten.nansum", "aten.linalg_vector_norm", "aten.norm", "aten.any",
                 "aten.count_nonzero"}
_POSITIONAL_REDUCE = {"aten.argmax", "aten.argmin", "aten.max", "aten.min", "aten.median", "aten.mode",
                      "aten.nanmedian", "aten.kthvalue"}


@register_rule("aten.sum", "aten.nansum", "aten.mean", "aten.nanmean", "aten.amax", "aten.amin", "aten.max",
               "aten.min", "aten.var", "aten.std", "aten.var_mean", "aten.std_mean", "aten.logsumexp",
               "aten.prod", "aten.any", "aten.all", "aten.argmax", "aten.argmin", "aten.linalg_vector_norm",
               "aten.norm", "aten.count_nonzero", "aten.median", "aten.nanmedian")
def _reduce(op: OpRecord, g: Ctx) -> None:
    """Kept dims are identical; a reduced dim decouples (sum: exact; mean/max: inexact; argmax: blocked)."""
    x = op.args[0]
    if not isinstance(x, Ref):
        return
    sx = g.shape(x)
    r = len(sx)
    dims = op.get("dim")
    if dims is None or dims == []:
        dims = list(range(r))
    elif isinstance(dims, int):
        dims = [dims]
    red = {_dim(d, r) for d in dims}
    if op.name in ("aten.max", "aten.min") and op.get("dim") is None:
        red = set(range(r))
    keep = bool(op.get("keepdim", False))
    if red and max(red) == r - 1 and len(red) == r - min(red):   # trailing dims: an RMSNorm's normalized_shape
        g.module_attr(op, "normalized_shape", x, sorted(red))
    for d in red:
        if op.name in _EXACT_REDUCE:
            continue
        if op.name in _POSITIONAL_REDUCE:
            g.block(x, [d], f"{op.name} (indices of positions)")
        else:
            g.inexact(x, d, f"{op.name} (reduced dim)")
    for o in op.outputs:
        so = g.shape(o)
        j = 0
        for i in range(r):
            if i in red:
                if keep:
                    j += 1
                continue
            if j < len(so) and so[j] == sx[i]:
                g.link(x, i, o, j)
            j += 1


@register_rule("aten.cumsum", "aten.cumprod", "aten.logcumsumexp", "aten.cummax", "aten.cummin")
def _cumulative(op: OpRecord, g: Ctx) -> None:
    x = op.args[0]
    d = _dim(op.args[1], len(g.shape(x)))
    for o in op.outputs:
        g.same(x, o)
    if op.name != "aten.cumsum":
        g.block(x, [d], f"{op.name} (order-dependent)")


@register_rule("aten._softmax", "aten._log_softmax", "aten.softmax", "aten.log_softmax", "aten._safe_softmax",
               "aten.special_softmax")
def _softmax(op: OpRecord, g: Ctx) -> None:
    """The normalized dim is blocked (removing a position changes every output); others identical."""
    x = op.args[0]
    d = _dim(op.args[1], len(g.shape(x)))
    for o in op.outputs:
        g.same(x, o)
    g.block(x, [d], f"{op.name}(dim={d}) (normalizes over this dim: removing a position changes every output)")


@register_rule("aten.sort", "aten.topk", "aten.argsort", "aten.msort")
def _sort(op: OpRecord, g: Ctx) -> None:
    x = op.args[0]
    sx = g.shape(x)
    d = _dim(op.get("dim", -1), len(sx))
    g.block(x, [d], f"{op.name} (order of positions)")
    for o in op.outputs:
        g.block(o, [d], f"{op.name} (order of positions)")
        so = g.shape(o)
        for i in range(len(sx)):
            if i != d and i < len(so) and so[i] == sx[i]:
                g.link(x, i, o, i)


@register_rule("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention",
               "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_cudnn_attention",
               "aten.scaled_dot_product_attention", "aten._scaled_dot_product_attention_math",
               "aten._scaled_dot_product_fused_attention_overrideable")
def _sdpa(op: OpRecord, g: Ctx) -> None:
    """q[..., L, E], k[..., S, E], v[..., S, Ev] -> out[..., L, Ev]: heads identical, E contracted.

    Without an explicit ``scale`` the default 1/sqrt(E) changes when E shrinks: E is then inexact.
    """
    q, k, v = op.args[:3]
    out = op.outputs[0]
    g.link(q, -1, k, -1)
    g.link(q, -2, out, -2)
    g.link(k, -2, v, -2)
    g.link(v, -1, out, -1)
    so = g.shape(out)
    sq, sk = g.shape(q), g.shape(k)
    for t in (q, k, v):
        st = g.shape(t)
        for i in range(3, min(len(st), len(so)) + 1):
            if st[-i] == so[-i]:
                g.link(t, len(st) - i, out, len(so) - i)
    if len(sq) >= 3 and len(sk) >= 3 and sq[-3] != sk[-3] and sk[-3] > 1 and sq[-3] % sk[-3] == 0:
        # GQA: query head h reads key/value head h // (Hq / Hkv): q heads are atoms (Hkv, rep)
        kv, rep = sk[-3], sq[-3] // sk[-3]
        akv, arep = g.edges.atom(kv), g.edges.atom(rep)
        g.edges.split(g.key(q, -3), [(akv, kv), (arep, rep)])
        for t in (k, v):
            g.edges.link(g.key(t, -3), akv)
    mask = op.get("attn_mask", op.get("attn_bias"))
    if isinstance(mask, Ref):
        sm = g.shape(mask)
        if sm[-2] == so[-2]:
            g.link(mask, -2, q, -2)
        if sm[-1] == g.shape(k)[-2]:
            g.link(mask, -1, k, -2)
        for i in range(3, min(len(sm), len(so)) + 1):
            if sm[-i] == so[-i]:
                g.link(mask, len(sm) - i, out, len(so) - i)
    for o in op.outputs[1:2]:   # logsumexp [..., L]
        sl = g.shape(o)
        if len(sl) == len(so) - 1:
            for i in range(len(sl)):
                if sl[i] == so[i]:
                    g.link(o, i, out, i)
    if op.get("scale") is None:
        g.inexact(q, -1, f"{op.name} (default scale 1/sqrt(head_dim))")
    if op.get("enable_gqa", False):
        g.block(q, [len(g.shape(q)) - 3], f"{op.name} (enable_gqa)")


@register_rule("aten.mkldnn_rnn_layer")
def _rnn_layer(op: OpRecord, g: Ctx) -> None:
    """One fused LSTM layer: hidden unit h is rows {h, H+h, 2H+h, 3H+h} of w_ih/w_hh/biases (4 gates)."""
    x, w_ih, w_hh = op.args[0], op.args[1], op.args[2]
    out = op.outputs[0]
    hidden = int(op.get("hidden_size"))
    sx, so = g.shape(x), g.shape(out)
    if g.shape(w_hh)[1] != hidden:
        for t in refs(op.args) + [Ref(o) for o in op.outputs]:
            g.block(t, None, f"{op.name} (projections)")
        return
    g.link(x, -1, w_ih, 1)
    for i in range(len(sx) - 1):
        g.link(x, i, out, i)
    g.link(w_hh, 1, out, -1)
    for w in refs(op.args[1:5]):
        if g.shape(w)[0] == 4 * hidden:
            g.gather(w, 0, out, len(so) - 1, np.arange(4 * hidden) % hidden)
    for t in refs(op.args[5:7]) + [Ref(o) for o in op.outputs[1:3]]:
        st = g.shape(t)
        g.link(t, len(st) - 1, out, len(so) - 1)
        if len(st) >= 2 and len(so) >= 2 and st[-2] == so[-2]:
            g.link(t, len(st) - 2, out, len(so) - 2)
    for o in op.outputs[3:]:
        g.block(o, None, f"{op.name} (workspace)")


@register_rule("torchvision.roi_align", "torchvision.roi_pool", "torchvision.ps_roi_align")
def _roi_align(op: OpRecord, g: Ctx) -> None:
    """roi_align(x[N, C, H, W], rois) -> [K, C, ph, pw]: channels pass through."""
    x, rois = op.args[0], op.args[1]
    out = op.outputs[0]
    g.link(x, 1, out, 1)
    g.block(x, [0, 2, 3], f"{op.name} (boxes)")
    g.block(out, [0, 2, 3], f"{op.name} (boxes)")
    g.block(rois, None, f"{op.name} (boxes)")


@register_rule("aten._native_multi_head_attention")
def _native_mha(op: OpRecord, g: Ctx) -> None:
    """nn.MultiheadAttention's fused inference path: qkv rows are atoms (3, heads, head_dim).

    Heads (and head_dim positions, shared by q/k/v) are coupled to the output projection's input.
    The default scale makes head_dim positions inexact; whole heads are exact.
    """
    q, k, v = op.args[:3]
    heads = int(op.get("num_head"))
    w, b, pw, pb = (op.get(n) for n in ("qkv_weight", "qkv_bias", "proj_weight", "proj_bias"))
    out = op.outputs[0]
    e3, e = g.shape(w)[0], g.shape(pw)[1]
    for t in (q, k, v):
        g.link(t, -1, w, 1)
        for i in range(len(g.shape(t)) - 1):
            g.link(t, i, out, i)
    e_ = g.edges
    a3, ah, ad = e_.atom(3), e_.atom(heads), e_.atom(e // heads)
    e_.split(g.key(w, 0), [(a3, 3), (ah, heads), (ad, e // heads)])
    e_.split(g.key(pw, 1), [(ah, heads), (ad, e // heads)])
    e_.block(a3, f"{op.name} (q/k/v)")
    e_.mark_inexact(ad, f"{op.name} (default scale 1/sqrt(head_dim))")
    if isinstance(b, Ref):
        g.link(b, 0, w, 0)
    g.link(pw, 0, out, -1)
    if isinstance(pb, Ref):
        g.link(pb, 0, out, -1)
    if e3 != 3 * e:
        g.block(w, None, f"{op.name} (unexpected qkv width)")
    mask = op.get("mask")
    if isinstance(mask, Ref):
        g.block(mask, None, f"{op.name} (mask)")
    for o in op.outputs[1:]:
        g.block(o, None, f"{op.name} (attention weights)")


@register_module_rule("torchvision.models.swin_transformer.ShiftedWindowAttention",
                      "torchvision.models.video.swin_transformer.ShiftedWindowAttention3d",
                      "torchvision.models.maxvit.RelativePositionalMultiHeadAttention")
def _fused_qkv_tied_to_input(name: str, m: object, node: object, g: Ctx) -> None:
    """torchvision ``shifted_window_attention`` reshapes qkv to ``(3, num_heads, C // num_heads)`` and the
    heads back to ``C``, with ``C`` the block's *input* width: the q, k and v widths equal the input width
    by size arithmetic the trace cannot see. Tie q/k/v row ``j`` to input channel ``j`` (as for
    ``nn.MultiheadAttention``), so heads are removed together with residual channels and head_dim stays
    ``C // num_heads``. The relative-position bias (V1 table column, V2 ``cpb_mlp`` output, ``logit_scale``)
    follows the heads through the ordinary index/view rules; the fixer sets ``num_heads``.

    MaxViT's ``RelativePositionalMultiHeadAttention`` is the same: ``to_qkv``'s chunks are reshaped to
    ``(n_heads, head_dim)`` and the heads back to the input width ``D``.
    """
    w = node(f"{name}.qkv", "weight")
    w = node(f"{name}.to_qkv", "weight") if w is None else w
    if w is None:
        return
    c3, c = g.shape(w)
    if c3 == 3 * c:
        g.gather(w, 0, w, 1, np.arange(c3) % c)
