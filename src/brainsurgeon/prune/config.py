"""The structural pruning config: :class:`ChannelPruning` (frozen, validated, YAML round trip).

    >>> cfg = ChannelPruning(ratio=0.5, importance="group_l2", scope="global", max_layer_ratio=0.8)
    >>> config_from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import Config, register_config
from ..errors import ConfigError

SCOPES = ("local", "global")
NORMALIZE = ("none", "mean", "max", "sum", "standardize")
REDUCE = ("sum", "mean", "max", "root")
RECONSTRUCT = ("none", "obs")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(f"ChannelPruning: {msg}")


@register_config
@dataclass(frozen=True)
class ChannelPruning(Config):
    """Remove whole channels (and every coupled slice) from a model, physically.

    ratio: fraction of channels removed, per group (``scope="local"``) or over all groups
    (``scope="global"``, ranked by one score; no group loses more than ``max_layer_ratio``).
    importance: a registered criterion (see :func:`brainsurgeon.prune.registered_importances`);
    ``normalize``/``reduce`` tune the group-norm criteria (DepGraph). ``steps``: iterative
    pruning, re-scoring after each step. ``round_to``: kept channels per group are a multiple
    of this. ``ignore``: module-name regexes whose output channels are never pruned.
    Attention heads, GQA groups and conv channel-groups are pruned as whole units: the graph's
    rows already are whole units (and a group with ``unit > 1`` is ranked unit by unit).
    ``head_dim_ratio``: after the channel steps, also remove this fraction of the dims *inside* every
    attention head (the same dims count from every head, so head_dim stays uniform; q/k coupled through
    QK^T, v/o coupled, both losing the same count; GQA kv heads shared by their query heads), for
    ``nn.MultiheadAttention``, torchvision ViT and transformers attention (see ``prune/heads.py``).
    ``reconstruct="obs"``: after removal, re-solve each consumer layer's remaining input weights
    by least squares on calibration inputs (needs ``calib``). ``seed``: for ``random``.

    >>> ChannelPruning(ratio=0.3, importance="obs", reconstruct="obs")
    """

    verb: ClassVar[str] = "prune"

    ratio: float = 0.5
    importance: str = "group_l2"
    scope: str = "local"
    max_layer_ratio: float = 0.9
    steps: int = 1
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    normalize: str = "mean"
    reduce: str = "sum"
    reconstruct: str = "none"
    damp: float = 0.01
    calib_batches: int = 0
    seed: int = 0
    head_dim_ratio: float = 0.0

    def __post_init__(self) -> None:
        from ..config import as_patterns, compile_patterns
        from .importance import registered_importances

        object.__setattr__(self, "ignore", as_patterns(self.ignore))  # a plain string is one pattern
        compile_patterns(self.ignore, what="ChannelPruning.ignore")  # a bad regex is a ConfigError here

        _check(isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0,
               f"ratio (fraction of channels removed) must be in [0, 1), got {self.ratio!r}; e.g. ratio=0.5")
        _check(self.importance in registered_importances(),
               f"unknown importance {self.importance!r}; registered: {registered_importances()}. "
               f"Add one with @register_importance('name') in brainsurgeon/prune/importance.py")
        _check(self.scope in SCOPES, f"scope must be one of {list(SCOPES)}, got {self.scope!r}")
        _check(isinstance(self.max_layer_ratio, (int, float)) and 0.0 < self.max_layer_ratio < 1.0,
               f"max_layer_ratio must be in (0, 1), got {self.max_layer_ratio!r}; e.g. 0.9")
        _check(self.scope == "global" or self.ratio <= self.max_layer_ratio,
               f"ratio={self.ratio} exceeds max_layer_ratio={self.max_layer_ratio} with scope='local'; "
               f"raise max_layer_ratio or lower ratio")
        _check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        _check(isinstance(self.head_dim_ratio, (int, float)) and 0.0 <= self.head_dim_ratio < 1.0,
               f"head_dim_ratio (fraction of the dims inside every attention head removed) must be in [0, 1), "
               f"got {self.head_dim_ratio!r}; e.g. head_dim_ratio=0.25")
        _check(isinstance(self.round_to, int) and self.round_to >= 1,
               f"round_to must be an integer >= 1 (1 = no rounding), got {self.round_to!r}")
        _check(isinstance(self.ignore, tuple) and all(isinstance(p, str) for p in self.ignore),
               f"ignore must be a tuple of module-name regexes, got {self.ignore!r}; e.g. ignore=('fc2',)")
        _check(self.normalize in NORMALIZE, f"normalize must be one of {list(NORMALIZE)}, got {self.normalize!r}")
        _check(self.reduce in REDUCE, f"reduce must be one of {list(REDUCE)}, got {self.reduce!r}")
        _check(self.reconstruct in RECONSTRUCT,
               f"reconstruct must be one of {list(RECONSTRUCT)}, got {self.reconstruct!r}")
        _check(isinstance(self.damp, (int, float)) and 0.0 <= self.damp < 1.0,
               f"damp (relative dampening, fraction of mean diag(H)) must be in [0, 1), got {self.damp!r}")
        _check(isinstance(self.calib_batches, int) and self.calib_batches >= 0,
               f"calib_batches must be >= 0 (0 = all), got {self.calib_batches!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["ignore"] = list(self.ignore)  # YAML-safe
        return d

    @property
    def needs_calib(self) -> bool:
        """Whether calibration data is required (data-driven criteria or reconstruction)."""
        from .importance import importance_needs

        return self.reconstruct != "none" or bool(importance_needs(self.importance))

    def describe(self) -> str:
        rec = " +obs-recon" if self.reconstruct == "obs" else ""
        hd = f" +{self.head_dim_ratio:.0%} head dims" if self.head_dim_ratio else ""
        return f"ChannelPruning {self.ratio:.0%} {self.importance} {self.scope}{hd}{rec}"
