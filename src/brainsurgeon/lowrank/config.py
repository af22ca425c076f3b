"""The low-rank factorization config: how ranks are chosen and which decomposition runs.

Exactly one rank rule is set::

    >>> LowRank(rank=32)                   # a fixed rank (Tucker-2: both ranks)
    >>> LowRank(rank_ratio=0.25)           # a fraction of the full rank min(rows, cols)
    >>> LowRank(param_ratio=0.5)           # a parameter budget: factorized <= 50% of dense
    >>> LowRank(energy=0.9)                # keep 90% of the (weighted) spectral energy
    >>> LowRank(param_ratio=0.5, activation_aware=True)   # SVD-LLM / ASVD, needs calib
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import Config, register_config
from ..errors import ConfigError


def _fail(field: str, msg: str) -> None:
    raise ConfigError(f"LowRank: {field} {msg}")


@register_config
@dataclass(frozen=True)
class LowRank(Config):
    """Truncated SVD for Linear (and 1x1 / channel-decomposed convs), Tucker-2 for k x k convs.

    activation_aware: minimise ||W X - A B X|| on calibration inputs X instead of ||W - A B||
    (SVD of W S with S S^T = X X^T: Wang et al., "SVD-LLM", 2024; Yuan et al., "ASVD", 2023);
    applies to the SVD paths (Linear, ``conv="svd"``, 1x1 convs), not to Tucker-2.
    conv: ``"tucker2"`` (1x1 -> k x k -> 1x1; Kim et al., ICLR 2016) or ``"svd"`` (k x k conv to
    rank r, then 1x1: Zhang et al., TPAMI 2016, which works with activation_aware).
    tucker_sweeps: HOOI/ALS sweeps after the HOSVD initialisation (0 = plain HOSVD).
    skip_larger: leave a layer dense when its factorization would not have fewer parameters.

    >>> LowRank(param_ratio=0.5, activation_aware=True, conv="svd")
    """

    verb: ClassVar[str] = "factorize"

    rank: int = 0
    rank_ratio: float = 0.0
    param_ratio: float = 0.0
    energy: float = 0.0
    activation_aware: bool = False
    conv: str = "tucker2"
    tucker_sweeps: int = 2
    damp: float = 0.01
    skip_larger: bool = True

    def __post_init__(self) -> None:
        rules = {"rank": self.rank, "rank_ratio": self.rank_ratio, "param_ratio": self.param_ratio,
                 "energy": self.energy}
        set_rules = [k for k, v in rules.items() if v]
        if len(set_rules) != 1:
            raise ConfigError(f"LowRank: set exactly one rank rule of {list(rules)}, got "
                              f"{set_rules or 'none'}; e.g. LowRank(param_ratio=0.5)")
        if not isinstance(self.rank, int) or self.rank < 0:
            _fail("rank", f"must be a positive integer (0 = unset), got {self.rank!r}")
        if not 0.0 <= self.rank_ratio <= 1.0:
            _fail("rank_ratio", f"must be in (0, 1] (fraction of min(rows, cols)), got {self.rank_ratio!r}")
        if not 0.0 <= self.param_ratio < 1.0:
            _fail("param_ratio", f"must be in (0, 1) (factorized / dense parameters), got {self.param_ratio!r}")
        if not 0.0 <= self.energy <= 1.0:
            _fail("energy", f"must be in (0, 1] (fraction of sum sigma^2 kept), got {self.energy!r}")
        if self.conv not in ("tucker2", "svd"):
            _fail("conv", f"must be 'tucker2' or 'svd', got {self.conv!r}")
        if not isinstance(self.tucker_sweeps, int) or not 0 <= self.tucker_sweeps <= 100:
            _fail("tucker_sweeps", f"must be an integer in [0, 100], got {self.tucker_sweeps!r}")
        if not 0.0 <= self.damp < 1.0:
            _fail("damp", f"(relative dampening of X X^T, fraction of its mean diagonal) must be in "
                          f"[0, 1), got {self.damp!r}")

    def describe(self) -> str:
        rule = next(f"{k}={v:g}" for k, v in (("rank", self.rank), ("rank_ratio", self.rank_ratio),
                                              ("param_ratio", self.param_ratio), ("energy", self.energy)) if v)
        return f"{'ASVD' if self.activation_aware else 'SVD'} {rule}"


@register_config
@dataclass(frozen=True)
class Separable(Config):
    """A compact-design transform of every k x k conv (groups=1): ``spatial`` (k x 1 then 1 x k; Jaderberg
    et al., BMVC 2014), ``depthwise`` (depthwise k x k with m filters per channel, then 1x1; MobileNets,
    Howard et al. 2017) or ``bottleneck`` (1x1 reduce, k x k, 1x1 expand; the Tucker-2 structure).

    ratio: fraction of the layer's weights kept (= of its MACs at stride 1); the rank is the largest
    that fits. data_aware: fit the layer OUTPUT on calibration data by ALS from the weight-space fit
    (needs calib), else the closed-form weight-space fit (SVD / HOOI). sweeps, cg_iters: ALS sweeps and
    conjugate-gradient steps per factor; damp: relative dampening of X X^T in the normal equations.
    bn_aware: with calib, weight each output channel's error by the square of the scale
    ``gamma / sigma`` of the BatchNorm2d that reads the conv's output (both fits), i.e. fit the
    BN-normalised output the next layer actually sees.

    >>> Separable(kind="depthwise", ratio=0.25)
    """

    verb: ClassVar[str] = "transform"

    kind: str = "spatial"
    ratio: float = 0.5
    data_aware: bool = True
    sweeps: int = 10
    cg_iters: int = 50
    damp: float = 0.01
    tucker_sweeps: int = 2
    skip_larger: bool = True
    bn_aware: bool = True

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ConfigError(f"Separable: {field} {msg}")

        if self.kind not in ("spatial", "depthwise", "bottleneck"):
            fail("kind", f"must be 'spatial', 'depthwise' or 'bottleneck', got {self.kind!r}")
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            fail("ratio", f"(fraction of the layer's weights kept) must be in (0, 1), got {self.ratio!r}; "
                          f"e.g. ratio=0.5 for 2x fewer MACs")
        if not isinstance(self.data_aware, bool):
            fail("data_aware", f"must be True or False, got {self.data_aware!r}")
        for f, hi in (("sweeps", 1000), ("cg_iters", 10000), ("tucker_sweeps", 100)):
            v = getattr(self, f)
            if not isinstance(v, int) or not 0 <= v <= hi:
                fail(f, f"must be an integer in [0, {hi}], got {v!r}")
        if not isinstance(self.damp, (int, float)) or not 0.0 <= self.damp < 1.0:
            fail("damp", f"(relative dampening of X X^T) must be in [0, 1), got {self.damp!r}")

    def describe(self) -> str:
        return f"Separable {self.kind} {self.ratio:.0%} {'data-aware' if self.data_aware else 'weight-space'}"
