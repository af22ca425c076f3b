"""The search space (which variants each layer may take) and the budget (what must shrink).

    >>> space = SearchSpace(levels=10, bits=(8, 4), nm_bits=(4,))
    >>> Budget.parse("flops=0.25")          # at most 25 % of the dense FLOPs: a 4x reduction
    Budget(metric='flops', fraction=0.25)
    >>> space = load_space("recipes/search-digits.yaml")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..config import Config, Pattern, config_from_dict, read_yaml, register_config
from ..errors import ConfigError


def _importances() -> list[str]:
    from ..prune.importance import registered_importances  # lazy: prune's registry fills on import

    return registered_importances()


METRICS = ("params", "bytes", "flops", "bops", "bops_obc", "latency")
ACT_OBSERVERS = ("minmax", "percentile", "mse", "ema")
PRUNE_METHODS = ("ExactOBS", "SparseGPT", "Magnitude")
QUANT_METHODS = ("OBQ", "GPTQ", "RTN")


def _fail(field: str, msg: str) -> None:
    raise ConfigError(f"SearchSpace.{field}: {msg}")


@register_config
@dataclass(frozen=True)
class SearchSpace(Config):
    """The variants of every searched layer, and how the database measures them.

    Unstructured levels are geometric in density, from dense down to ``1 - max_sparsity``
    (OBC's database grid): density_k = (1 - max_sparsity)^(k / levels), k = 0..levels.
    Each layer also gets the N:M patterns in `nm`, block-`block` sparsity at `block_sparsities`,
    the weight bit widths in `bits` (dense), and every N:M pattern combined with `nm_bits`.

    act_bits: activation bits for BOPs (brainsurgeon quantizes weights only, so 32 by default).
    model_loss: also measure, per entry, the model-output distortion with only that layer
    compressed (OBC's per-layer database score); otherwise the solvers use the OBS rel. loss.
    channel_ratios: structured variants removing that fraction of a layer's output channels with
    ``brainsurgeon.prune`` (importance `channel_importance`); a channel space holds only those.
    lowrank_ratios: low-rank variants ``lr@p`` of every Linear / Conv2d (groups=1): the
    activation-aware SVD at the largest rank whose factors hold at most p of the dense weights
    (:mod:`.factored`), applied by the ``factorize`` verb.
    joint: weight + activation variants ``[N:M+]XwYa`` (OBC's joint space: ``8w8a``, ``4w4a``,
    ``2:4+8w8a``, ``2:4+4w4a``): the layer's input gets a static per-tensor `act_observer`
    quantizer and its weight solve uses the Hessian of the quantized inputs.
    separable_ratios: compact-design variants ``sep-KIND@p`` of every k x k Conv2d (groups=1), one per
    kind in `separable_kinds` (spatial / depthwise / bottleneck, :class:`~brainsurgeon.lowrank.Separable`)
    keeping p of the weights, fitted data-aware on the layer's input Hessian; their costs are those of
    the real replacement module; applied by the ``transform`` verb (``transform_``).

    >>> SearchSpace(levels=4, nm=(), block_sparsities=(), bits=(4,), nm_bits=())
    """

    verb: ClassVar[str] = "search"

    prune_method: str = "ExactOBS"
    quant_method: str = "OBQ"
    levels: int = 10
    max_sparsity: float = 0.95
    nm: tuple[str, ...] = ("2:4",)
    block: int = 4
    block_sparsities: tuple[float, ...] = (0.5, 0.75)
    bits: tuple[int, ...] = (8, 6, 4, 3, 2)
    nm_bits: tuple[int, ...] = (8, 4)
    act_bits: int = 32
    quant_sym: bool = True  # symmetric grids; False: asymmetric per-channel (OBC's CNN setting)
    ignore: tuple[str, ...] = ()
    model_loss: bool = True
    model_loss_batches: int = 4
    latency: bool = False
    damp: float = 0.01
    channel_ratios: tuple[float, ...] = ()  # structured: fractions of a layer's output channels removed
    channel_importance: str = "group_l2"
    lowrank_ratios: tuple[float, ...] = ()  # low-rank: factorized weights <= this fraction of the dense ones
    joint: tuple[str, ...] = ()  # weight + activation variants: "8w8a", "2:4+4w4a", any "[N:M+]XwYa"
    act_observer: str = "minmax"  # observer of the joint variants' static per-tensor activation scales
    separable_ratios: tuple[float, ...] = ()  # compact designs of k x k convs keeping this fraction of weights
    separable_kinds: tuple[str, ...] = ("spatial", "depthwise", "bottleneck")

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML gives lists: store tuples so the space stays hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if self.prune_method not in PRUNE_METHODS:
            _fail("prune_method", f"{self.prune_method!r} is not one of {list(PRUNE_METHODS)}")
        if self.quant_method not in QUANT_METHODS:
            _fail("quant_method", f"{self.quant_method!r} is not one of {list(QUANT_METHODS)}")
        if not (isinstance(self.levels, int) and 0 <= self.levels <= 64):
            _fail("levels", f"must be an integer in [0, 64] (0 = no unstructured levels), got {self.levels!r}")
        if not 0.0 < self.max_sparsity < 1.0:
            _fail("max_sparsity", f"must be in (0, 1), e.g. 0.95, got {self.max_sparsity!r}")
        for p in self.nm:
            if Pattern.parse(p).kind != "nm":
                _fail("nm", f"{p!r} is not an N:M pattern; use e.g. '2:4'")
        if not (isinstance(self.block, int) and self.block >= 2):
            _fail("block", f"block size must be an integer >= 2, got {self.block!r}")
        for s in self.block_sparsities:
            if not 0.0 < s < 1.0:
                _fail("block_sparsities", f"each level must be in (0, 1), got {s!r}")
        for name in ("bits", "nm_bits"):
            for b in getattr(self, name):
                if not (isinstance(b, int) and 2 <= b <= 8):
                    _fail(name, f"each bit width must be an integer in [2, 8], got {b!r}")
        if not (isinstance(self.act_bits, int) and 1 <= self.act_bits <= 32):
            _fail("act_bits", f"must be an integer in [1, 32] (32 = float activations), got {self.act_bits!r}")
        for j in self.joint:
            try:
                parse_joint(j)
            except ConfigError as e:
                _fail("joint", str(e))
        if self.act_observer not in ACT_OBSERVERS:
            _fail("act_observer", f"{self.act_observer!r} is not one of {list(ACT_OBSERVERS)}")
        if self.model_loss_batches < 1:
            _fail("model_loss_batches", f"must be >= 1, got {self.model_loss_batches!r}")
        if not 0.0 <= self.damp < 1.0:
            _fail("damp", f"relative dampening must be in [0, 1), got {self.damp!r}")
        for r in self.channel_ratios:
            if not 0.0 < r < 1.0:
                _fail("channel_ratios", f"each ratio must be in (0, 1), got {r!r}")
        if self.channel_importance not in _importances():
            _fail("channel_importance", f"{self.channel_importance!r} is not a registered criterion; "
                  f"use one of {_importances()} (register one with @register_importance)")
        for r in self.lowrank_ratios:
            if not 0.0 < r < 1.0:
                _fail("lowrank_ratios", f"each ratio (factorized / dense weights) must be in (0, 1), got {r!r}")
        for r in self.separable_ratios:
            if not 0.0 < r < 1.0:
                _fail("separable_ratios", f"each ratio (design / dense weights) must be in (0, 1), got {r!r}")
        for k in self.separable_kinds:
            if k not in ("spatial", "depthwise", "bottleneck"):
                _fail("separable_kinds", f"{k!r} is not one of ['spatial', 'depthwise', 'bottleneck']")
        if self.channel_ratios and (self.levels or self.nm or self.block_sparsities or self.bits or self.nm_bits
                                    or self.lowrank_ratios or self.separable_ratios or self.joint or self.latency
                                    or not self.model_loss):
            _fail("channel_ratios", "channel variants change the shapes of consumer layers, so they cannot share a "
                  "database with per-weight variants; use a space of its own: levels=0, nm=[], block_sparsities=[], "
                  "bits=[], nm_bits=[], lowrank_ratios=[], separable_ratios=[], latency=false, model_loss=true")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def describe(self) -> str:
        if self.channel_ratios:
            return f"SearchSpace channels {list(self.channel_ratios)} ({self.channel_importance})"
        return (f"SearchSpace {self.prune_method}/{self.quant_method}: {self.levels} levels to "
                f"{self.max_sparsity:.0%}, N:M {list(self.nm)}, block{self.block} {list(self.block_sparsities)}, "
                f"bits {list(self.bits)}, N:M+bits {list(self.nm_bits)}"
                + (f", low-rank {list(self.lowrank_ratios)}" if self.lowrank_ratios else "")
                + (f", joint {list(self.joint)}" if self.joint else "")
                + (f", separable {list(self.separable_kinds)} at {list(self.separable_ratios)}"
                   if self.separable_ratios else ""))


def parse_joint(text: str) -> tuple[str, int, int]:
    """A joint weight + activation variant ``[N:M+]XwYa`` -> (pattern or "", weight bits, activation bits).

    >>> parse_joint("2:4+4w8a")
    ('2:4', 4, 8)
    """
    m = re.fullmatch(r"(?:(\d+:\d+)\+)?(\d+)w(\d+)a", str(text))
    if m is None:
        raise ConfigError(f"joint variant {text!r}: expected [N:M+]XwYa, e.g. '8w8a', '4w4a', '2:4+4w4a'")
    pat, w, a = m.group(1) or "", int(m.group(2)), int(m.group(3))
    if pat:
        Pattern.parse(pat)
    if not (2 <= w <= 8 and 2 <= a <= 8):
        raise ConfigError(f"joint variant {text!r}: weight and activation bits must be in [2, 8], got {w} and {a}")
    return pat, w, a


@dataclass(frozen=True)
class Budget:
    """At most `fraction` of the dense model's `metric` (params, bytes, flops, bops, bops_obc, latency).

    ``bops`` = MACs x weight bits x activation bits (dense fp32: 32 x 32 per MAC); ``bops_obc``
    = MACs x max(weight bits, activation bits), dense 32 per MAC: the linear count of OBC's code
    (Frantar & Alistarh 2022), in which 8w8a is 4x, 4w4a 8x and 2:4 + 4w4a 16x cheaper than dense.

    ``fraction=0.25`` is a 4x reduction. Layers outside the search space count at their
    dense cost.

    >>> Budget.parse("bops=0.125")
    Budget(metric='bops', fraction=0.125)
    """

    metric: str
    fraction: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"Budget.metric: {self.metric!r} is not one of {list(METRICS)}; "
                              f"e.g. Budget('flops', 0.25)")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"Budget.fraction: must be in (0, 1] (0.25 = 4x cheaper than dense), "
                              f"got {self.fraction!r}")

    @staticmethod
    def parse(text: str) -> Budget:
        """Parse ``metric=fraction`` (``flops=0.25``) or ``metric=Nx`` (``bops=8x``)."""
        metric, sep, value = str(text).partition("=")
        if not sep:
            raise ConfigError(f"budget {text!r}: expected METRIC=FRACTION or METRIC=Nx, e.g. 'flops=0.25' "
                              f"or 'bops=8x'; metrics: {list(METRICS)}")
        try:
            frac = 1.0 / float(value[:-1]) if value.endswith("x") else float(value)
        except (ValueError, ZeroDivisionError) as e:
            raise ConfigError(f"budget {text!r}: {value!r} is not a number or Nx factor") from e
        return Budget(metric.strip(), frac)

    def __str__(self) -> str:
        return f"{self.metric}={self.fraction:g}"


def load_space(path_or_text: str) -> SearchSpace:
    """Read a search space from a YAML file or text (a mapping of SearchSpace fields).

    >>> load_space("levels: 4\\nbits: [8, 4]").levels
    4
    """
    data = read_yaml(path_or_text, "search space")
    if not isinstance(data, dict):
        raise ConfigError(f"search space must be a YAML mapping of SearchSpace fields, got {type(data).__name__}; "
                          f"e.g. 'levels: 10\\nbits: [8, 4]'")
    data = dict(data.get("space", data))
    data.setdefault("type", "SearchSpace")
    space = config_from_dict(data)
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"search space: type must be SearchSpace, got {type(space).__name__}")
    return space
