"""timm blocks whose sizes live in module code: attention heads sized from the input width, EvoNorm groups.

PVT-v2's ``Attention``, CoaT's ``FactorAttnConvRelPosEnc`` and the blocks of ``_INPUT_WIDTH_ATTENTION`` (BEiT,
EVA, CaiT, NesT, ConViT, CrossViT, XCiT, DaViT, EdgeNeXt, GC ViT, MetaFormer, Next-ViT, Twins, VOLO, Swin V2, ...)
reshape their projections with ``(num_heads, C // num_heads)`` or ``self.head_dim`` and merge the heads
back to ``C`` — ``C`` read from the block's input. The trace only sees the resulting integers, so the
q/k/v widths look free while the code needs them equal to the input width. The rules tie q/k/v row ``j``
to input channel ``j`` (as for ``nn.MultiheadAttention``): heads (or the same dims of every head) then go
together with residual channels, and the fixers below set ``num_heads``/``head_dim``/``channel_splits``
from what was removed.

    x[B, N, C] -q-> [B, N, C] -view-> [B, N, H, C/H]      q row j == input channel j  (tie)
    x[B, N, C] -sr conv-> [B, C, h, w] -view-> [B, C, h*w]  sr out j == sr in j       (tie)

Fixers only (the ops already carry the ties; the attributes must follow or verification fails and
the group is bisected away): ViT/SAM ``Attention`` (``num_heads``/``head_dim``/``attn_dim``), LeViT
attention (per-head ``[key_dim, key_dim, val_dim]`` split), EvoNorm-S (``groups`` of ``group_std``), VOLO class
attention and ``AttentionRope`` (GQA), relative-position bias tables/MLPs (``bias_shape``), MetaFormer ``Scale``
(``shape``), SelectiveKernel (``in_channels`` of its split).

Keyed by class name: importing timm is not a graph dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..errors import SurgeryError
from .rules import Ctx, register_module_rule
from .surgery import register_named_fixer

_EMPTY = np.zeros(0, dtype=np.int64)


def _tie_rows_to_inputs(w: int | None, g: Ctx) -> None:
    """Weight ``[k*C, C, ...]``: output row ``j`` is input channel ``j % C``."""
    if w is None:
        return
    shape = g.shape(w)
    if len(shape) >= 2 and shape[0] % shape[1] == 0:
        g.gather(w, 0, w, 1, np.arange(shape[0]) % shape[1])


@register_module_rule("timm.models.pvt_v2.Attention")
def _pvt_v2_attention(name: str, m: object, node: Any, g: Ctx) -> None:
    """``q`` is reshaped to ``(num_heads, -1)``, ``kv`` to ``(2, num_heads, head_dim)``, the spatial
    reduction ``sr`` output to ``(C, -1)`` and the heads back to ``(B, N, C)``, all with the input's ``C``."""
    for child in ("q", "kv", "sr"):
        _tie_rows_to_inputs(node(f"{name}.{child}", "weight"), g)


@register_module_rule("timm.models.coat.FactorAttnConvRelPosEnc")
def _coat_attention(name: str, m: object, node: Any, g: Ctx) -> None:
    """``qkv`` is reshaped to ``(3, num_heads, C // num_heads)`` and the heads back to ``C``, the input width."""
    _tie_rows_to_inputs(node(f"{name}.qkv", "weight"), g)


def _heads_after(r: np.ndarray, heads: int, head_dim: int, where: str) -> tuple[int, int]:
    """``(num_heads, head_dim)`` after removing rows ``r`` of a ``heads x head_dim`` projection: whole heads,
    or the same number of dims from every head."""
    if not len(r):
        return heads, head_dim
    counts = np.bincount(r // head_dim, minlength=heads)
    if counts.min() == counts.max() and counts[0] < head_dim:
        return heads, head_dim - int(counts[0])
    if ((counts == 0) | (counts == head_dim)).all():
        return heads - int((counts == head_dim).sum()), head_dim
    raise SurgeryError(f"{where}: removal mixes whole heads and partial heads (rows removed per head "
                       f"{counts.tolist()}, {head_dim} per head); remove whole heads or the same dims of every head")


@register_named_fixer("timm.models.pvt_v2.Attention", container=True)
def _pvt_v2_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    r = removed.get("q.weight", {}).get(0, _EMPTY)
    m.num_heads, m.head_dim = _heads_after(r, m.num_heads, m.head_dim, type(m).__name__)
    m.dim = int(m.q.weight.shape[0])


@register_named_fixer("timm.models.coat.FactorAttnConvRelPosEnc", container=True)
def _coat_attention_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    r = removed.get("qkv.weight", {}).get(0, _EMPTY)
    width = (int(m.qkv.weight.shape[0]) + len(r)) // 3   # q width before the removal
    heads, _ = _heads_after(r[r < width], m.num_heads, width // m.num_heads, type(m).__name__)
    m.num_heads = heads


@register_named_fixer("timm.models.coat.ConvRelPosEnc", container=True)
def _coat_crpe_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """``torch.split`` of v by ``channel_splits`` (one depthwise conv per window size)."""
    convs: list[nn.Module] = list(m.conv_list)
    m.channel_splits = [int(c.weight.shape[0]) for c in convs]


@register_named_fixer("timm.layers.evo_norm.EvoNorm2dS0", "timm.layers.evo_norm.EvoNorm2dS1",
                      "timm.layers.evo_norm.EvoNorm2dS2")
def _evonorm_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """EvoNorm-S ``group_std`` reshapes to ``(groups, C // groups)``: whole groups removed lower ``groups``,
    the same count from every group keeps it."""
    r = next((d[0] for d in removed.values() if 0 in d), _EMPTY)
    width = int(m.weight.shape[0]) + len(r)
    m.groups, _ = _heads_after(r, m.groups, width // m.groups, type(m).__name__)
    if isinstance(getattr(m, "num_features", None), int):
        m.num_features = int(m.weight.shape[0])


@register_named_fixer("timm.models.levit.Attention", "timm.models.levit.AttentionDownsample", container=True)
def _levit_attention_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """LeViT views ``qkv`` (``kv`` when downsampling) as ``(num_heads, -1)`` and splits every head into
    ``[key_dim, key_dim, val_dim]`` (``[key_dim, val_dim]``): the dims follow what each head lost."""
    down = hasattr(m, "kv")
    parts = np.array([m.key_dim, m.val_dim] if down else [m.key_dim, m.key_dim, m.val_dim])
    r = removed.get("kv.linear.weight" if down else "qkv.linear.weight", {}).get(0, _EMPTY)
    heads, per = m.num_heads, int(parts.sum())
    if len(r):
        counts = np.zeros((heads, len(parts)), dtype=np.int64)   # rows removed per (head, part)
        np.add.at(counts, (r // per, np.searchsorted(np.cumsum(parts), r % per, side="right")), 1)
        whole = (counts == parts).all(1)
        if whole.any() and ((counts == parts).all(1) | (counts == 0).all(1)).all():
            heads -= int(whole.sum())
        elif (counts == counts[0]).all() and (down or counts[0, 0] == counts[0, 1]):
            parts = parts - counts[0]
        else:
            raise SurgeryError(f"{type(m).__name__}: every head must lose the same q/k/v dims (q and k alike) or "
                               f"be removed whole; rows removed per head and part {counts.tolist()}")
    m.num_heads, m.key_dim, m.val_dim = heads, int(parts[0]), int(parts[-1])
    m.key_attn_dim, m.val_attn_dim = m.key_dim * heads, m.val_dim * heads
    m.attention_bias_cache = {}   # eval-mode cache of the (now sliced) per-head biases


@register_named_fixer("timm.models.vision_transformer_sam.Attention", "timm.layers.attention.Attention",
                      container=True)
def _fused_qkv_attention_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """timm ViT ``Attention`` reshapes ``qkv`` to ``(3, num_heads, head_dim)`` and back to ``attn_dim``;
    SAM ViT views it as ``(3, num_heads, -1)``: ``num_heads`` (whole heads) or ``head_dim`` follows."""
    r = removed.get("qkv.weight", {}).get(0, _EMPTY)
    width = (int(m.qkv.weight.shape[0]) + len(r)) // 3   # q width before the removal
    m.num_heads, m.head_dim = _heads_after(r[r < width], m.num_heads, m.head_dim, type(m).__name__)
    if isinstance(getattr(m, "attn_dim", None), int):
        m.attn_dim = m.num_heads * m.head_dim


# Attention blocks that size their heads from the input width: ``reshape(B, N, 3, num_heads, C // num_heads)``
# or ``reshape(B, N, 3, num_heads, -1)`` ... ``reshape(B, N, C)``, ``C`` read from the block's input: the
# projection children listed are tied to the input (their heads and the residual width go together, as
# PVT-v2's). The first Linear child's rows (``k`` fused parts: ``[k*C, C]``) give ``num_heads``/``head_dim``.
_INPUT_WIDTH_ATTENTION = {
    "timm.models.beit.Attention": ("qkv",),
    "timm.models.eva.EvaAttention": ("qkv", "q_proj", "k_proj", "v_proj"),
    "timm.models.cait.TalkingHeadAttn": ("qkv",),
    "timm.models.cait.ClassAttn": ("q", "k", "v"),
    "timm.models.nest.Attention": ("qkv",),
    "timm.models.convit.MHSA": ("qkv",),
    "timm.models.convit.GPSA": ("qk", "v"),
    "timm.models.crossvit.CrossAttention": ("wq", "wk", "wv"),
    "timm.models.xcit.XCA": ("qkv",),
    "timm.models.vision_transformer_relpos.RelPosAttention": ("qkv",),
    "timm.models.davit.WindowAttention": ("qkv",),
    "timm.models.davit.ChannelAttention": ("qkv",),
    "timm.models.edgenext.CrossCovarianceAttn": ("qkv",),
    "timm.models.gcvit.WindowAttentionGlobal": ("qkv",),
    "timm.models.metaformer.Attention": ("qkv",),
    "timm.models.nextvit.EfficientAttention": ("q", "k", "v"),
    "timm.models.twins.LocallyGroupedAttn": ("qkv",),
    "timm.models.twins.GlobalSubSampleAttn": ("q", "kv", "sr"),
    "timm.models.volo.Attention": ("qkv",),
    "timm.layers.attention_pool.AttentionPoolLatent": ("kv",),
    "timm.models.swin_transformer_v2.WindowAttention": ("qkv",),
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": ("qkv",),
}
# the same attributes, merged back to ``num_heads * head_dim`` (attributes, not the input width): no tie
_HEADS_ONLY = {"timm.models.volo.ClassAttention": ("q",)}


def _qualname(m: object) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


@register_module_rule(*_INPUT_WIDTH_ATTENTION)
def _input_width_attention(name: str, m: object, node: Any, g: Ctx) -> None:
    """Every projection row ``j`` is input channel ``j % C`` (``C // num_heads`` per head, merged back to ``C``)."""
    for child in _INPUT_WIDTH_ATTENTION.get(_qualname(m), ()):
        _tie_rows_to_inputs(node(f"{name}.{child}", "weight"), g)


@register_named_fixer(*_INPUT_WIDTH_ATTENTION, *_HEADS_ONLY, container=True)
def _heads_attention_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """``num_heads`` (whole heads) or ``head_dim`` (the same dims of every head) follow the rows removed from
    the first projection's first part; ``attn_dim``/``attention_dim`` follow both."""
    children = _INPUT_WIDTH_ATTENTION.get(_qualname(m)) or _HEADS_ONLY[_qualname(m)]
    child = next((c for c in children if isinstance(getattr(m, c, None), nn.Linear)), None)
    if child is None:
        return
    w = getattr(m, child).weight
    r = removed.get(f"{child}.weight", {}).get(0, _EMPTY)
    parts = max(1, int(w.shape[0]) // int(w.shape[1])) if child not in _HEADS_ONLY.get(_qualname(m), ()) else 1
    width = (int(w.shape[0]) + len(r)) // parts   # one part's width before the removal
    m.num_heads, head_dim = _heads_after(r[r < width], m.num_heads, width // m.num_heads, type(m).__name__)
    if isinstance(getattr(m, "head_dim", None), int):
        m.head_dim = head_dim
    for attr in ("attn_dim", "attention_dim"):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, m.num_heads * head_dim)


@register_named_fixer("timm.layers.pos_embed_rel.RelPosMlp", "timm.layers.pos_embed_rel.RelPosBias", container=True)
def _rel_pos_heads_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """A relative-position bias per head (an MLP's outputs or a table's columns): ``bias_shape`` (and the MLP's
    ``view(-1, num_heads)``) follow the heads kept."""
    heads = int(m.mlp.fc2.weight.shape[0]) if hasattr(m, "mlp") else int(m.relative_position_bias_table.shape[1])
    old = getattr(m, "num_heads", None) or m.bias_shape[-1]
    if isinstance(m.bias_shape, tuple) and m.bias_shape and m.bias_shape[-1] == old:
        m.bias_shape = (*m.bias_shape[:-1], heads)
    if hasattr(m, "num_heads"):
        m.num_heads = heads


@register_named_fixer("timm.layers.attention.AttentionRope", container=True)
def _attention_rope_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """Fused ``qkv`` (``num_kv_heads == num_heads``) or ``q_proj``/``k_proj`` (GQA): heads or head dims follow."""
    if isinstance(getattr(m, "qkv", None), nn.Linear):
        r = removed.get("qkv.weight", {}).get(0, _EMPTY)
        width = (int(m.qkv.weight.shape[0]) + len(r)) // 3
        heads, hd = _heads_after(r[r < width], m.num_heads, m.head_dim, type(m).__name__)
        kv_heads = heads
    else:
        rq = removed.get("q_proj.weight", {}).get(0, _EMPTY)
        rk = removed.get("k_proj.weight", {}).get(0, _EMPTY)
        heads, hd = _heads_after(rq, m.num_heads, m.head_dim, type(m).__name__)
        kv_heads, _ = _heads_after(rk, m.num_kv_heads, m.head_dim, type(m).__name__)
    m.num_heads, m.num_kv_heads, m.head_dim = heads, kv_heads, hd
    m.num_kv_groups = heads // kv_heads
    m.attn_dim, m.kv_dim = hd * heads, hd * kv_heads


@register_named_fixer("timm.models.metaformer.Scale")
def _metaformer_scale_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """``x * self.scale.view(self.shape)``: the channel count in ``shape`` follows the kept scales."""
    m.shape = (int(m.scale.shape[0]), *tuple(m.shape)[1:])


@register_named_fixer("timm.layers.selective_kernel.SelectiveKernel", container=True)
def _selective_kernel_fix(m: Any, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """``torch.split(x, self.in_channels // self.num_paths)`` feeds one path each: ``in_channels`` follows the
    paths' kept inputs (every piece loses the same positions: equal split pieces are coupled)."""
    convs = [next(c for c in p.modules() if isinstance(c, nn.Conv2d)) for p in m.paths]
    per_path = [int(c.weight.shape[1]) * c.groups for c in convs]
    m.in_channels = sum(per_path) if m.split_input else per_path[0]
    m.out_channels = int(convs[0].weight.shape[0])
