"""The variants of one layer: a name and the configs that make it, applied in order.

    >>> [v.name for v in layer_variants(SearchSpace(levels=2, nm=(), block_sparsities=(),
    ...                                              bits=(4,), nm_bits=()), in_channels=16)]
    ['dense', 'sp@0.7764', 'sp@0.9500', 'w4']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import RTN, ActQuant, Config, Pattern, config_from_dict
from .config import SearchSpace, parse_joint


@dataclass(frozen=True)
class Variant:
    """One compressed form of a layer: a sparsify config and/or a quantize config (or none: dense).

    level: the sparsity the variant removes (0 for dense and pure quantization);
    bits: the weight bits (32 = float); act_bits: the activation bits of a joint variant (32 = float,
    i.e. the space's ``act_bits``).
    """

    name: str
    configs: tuple[Config, ...]
    sparsity: float = 0.0
    bits: int = 32
    pattern: str = "unstructured"
    act_bits: int = 32

    @property
    def family(self) -> str:
        """Variants of one family differ only in their level (used by the uniform baseline)."""
        return self.name.split("@")[0] if "@" in self.name else self.name


def unstructured_levels(space: SearchSpace) -> list[float]:
    """Sparsities 1 - (1 - max_sparsity)^(k / levels), k = 1..levels (geometric in density).

    >>> [round(s, 3) for s in unstructured_levels(SearchSpace(levels=2, max_sparsity=0.75))]
    [0.5, 0.75]
    """
    d_min = 1.0 - space.max_sparsity
    return [round(1.0 - d_min ** (k / space.levels), 4) for k in range(1, space.levels + 1)]


def _prune(space: SearchSpace, sparsity: float | None, pattern: str) -> Config:
    d = {"type": space.prune_method, "pattern": pattern}
    if sparsity is not None:
        d["sparsity"] = sparsity
    if space.prune_method != "Magnitude":
        d["damp"] = space.damp
    return config_from_dict(d)


def _quant(space: SearchSpace, bits: int) -> Config:
    d = {"type": space.quant_method, "bits": bits, "sym": space.quant_sym}
    if space.quant_method != RTN.__name__:
        d["damp"] = space.damp
    return config_from_dict(d)


def rank_for(ratio: float, rows: int, cols: int) -> int:
    """The largest rank whose factors hold at most `ratio` of the rows x cols weights (0 if none).

    >>> rank_for(0.5, 64, 128)
    21
    """
    return int(math.floor(ratio * rows * cols / (rows + cols)))


def joint_variants(space: SearchSpace, in_channels: int) -> list[Variant]:
    """The joint weight + activation variants (``8w8a``, ``2:4+4w4a``, ...) a layer can take.

    Each is [an N:M prune config,] a `bits`-bit weight config and an ActQuant config (static, per
    tensor, ``space.act_observer``); an N:M entry is skipped where M does not divide `in_channels`.

    >>> [v.name for v in joint_variants(SearchSpace(joint=("8w8a", "2:4+4w4a")), in_channels=3)]
    ['8w8a']
    """
    out = []
    for text in space.joint:
        pat, w, a = parse_joint(text)
        act = ActQuant(bits=a, observer=space.act_observer)
        if pat:
            p = Pattern.parse(pat)
            if in_channels % p.m:
                continue
            out.append(Variant(text, (_prune(space, None, pat), _quant(space, w), act), float(p.sparsity), w, pat, a))
        else:
            out.append(Variant(text, (_quant(space, w), act), bits=w, act_bits=a))
    return out


def _prune_patterns(space: SearchSpace) -> tuple[str, ...]:
    from ..config import _REGISTRY

    return getattr(_REGISTRY[space.prune_method], "patterns", ())


def lowrank_variants(space: SearchSpace, rows: int, cols: int) -> list[Variant]:
    """``lr@p`` for each ratio p whose rank is in [1, min(rows, cols)) (smaller ratios first, one per rank).

    >>> [v.name for v in lowrank_variants(SearchSpace(lowrank_ratios=(0.25, 0.5)), rows=64, cols=128)]
    ['lr@0.2500', 'lr@0.5000']
    """
    from ..lowrank import LowRank

    out, seen = [], set()
    for p in sorted(space.lowrank_ratios):
        r = rank_for(p, rows, cols)
        if 1 <= r < min(rows, cols) and r not in seen:
            seen.add(r)
            out.append(Variant(f"lr@{p:.4f}", (LowRank(rank=r, activation_aware=True, conv="svd", damp=space.damp),),
                               pattern="lowrank"))
    return out


def separable_variants(space: SearchSpace, conv: Any) -> list[Variant]:
    """``sep-KIND@p`` for each kind in ``space.separable_kinds`` that applies to `conv` (a k x k Conv2d,
    groups=1) and each p in ``space.separable_ratios`` whose design is smaller than the conv.

    >>> [v.name for v in separable_variants(SearchSpace(separable_ratios=(0.5,), separable_kinds=("spatial",)),
    ...                                     nn.Conv2d(16, 32, 3, padding=1))]
    ['sep-spatial@0.5000']
    """
    from torch import nn

    from ..lowrank import Separable
    from ..lowrank.separable import design_params, design_rank
    from ..lowrank.transform import _why_not

    if not isinstance(conv, nn.Conv2d):
        return []
    shape = tuple(conv.weight.shape)
    out = []
    for kind in space.separable_kinds:
        if _why_not(conv, kind):
            continue
        for p in sorted(space.separable_ratios):
            if design_params(kind, shape, design_rank(kind, shape, p)) >= conv.weight.numel():
                continue
            out.append(Variant(f"sep-{kind}@{p:.4f}", (Separable(kind=kind, ratio=p, damp=space.damp, bn_aware=False),),
                               pattern="separable"))
    return out


def layer_variants(space: SearchSpace, in_channels: int, matrix: tuple[int, int] | None = None,
                   conv: Any = None) -> list[Variant]:
    """Every variant of a layer whose grouped input dimension is `in_channels` (N:M/blocks must divide it).

    matrix: (rows, cols) of the weight when the layer can be factorized (Linear, Conv2d groups=1);
    low-rank variants are offered only then. conv: the module, for the compact-design variants of a
    k x k Conv2d (``space.separable_ratios``).
    """
    out = [Variant("dense", ())]
    if space.channel_ratios:
        from ..prune import ChannelPruning

        return out + [Variant(f"ch@{r:.4f}", (ChannelPruning(ratio=r, importance=space.channel_importance),),
                              sparsity=r, pattern="channels") for r in space.channel_ratios]
    out += [Variant(f"sp@{s:.4f}", (_prune(space, s, "unstructured"),), sparsity=s)
            for s in unstructured_levels(space)] if space.levels else []
    for p in space.nm:
        pat = Pattern.parse(p)
        if in_channels % pat.m:
            continue
        out.append(Variant(p, (_prune(space, None, p),), sparsity=float(pat.sparsity), pattern=p))
        out += [Variant(f"{p}+w{b}", (_prune(space, None, p), _quant(space, b)), float(pat.sparsity), b, p)
                for b in space.nm_bits]
    if in_channels % space.block == 0 and "block" in _prune_patterns(space):
        blk = f"block{space.block}"
        out += [Variant(f"{blk}@{s:.4f}", (_prune(space, s, blk),), sparsity=s, pattern=blk)
                for s in space.block_sparsities]
    out += [Variant(f"w{b}", (_quant(space, b),), bits=b) for b in space.bits]
    out += joint_variants(space, in_channels)
    out += lowrank_variants(space, *matrix) if matrix is not None and space.lowrank_ratios else []
    return out + (separable_variants(space, conv) if conv is not None and space.separable_ratios else [])
