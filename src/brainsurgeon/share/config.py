"""The weight-sharing config (Deep Compression's trained quantization).

    >>> WeightSharing(bits=4)                                   # 16 shared values per layer
    >>> WeightSharing(bits=5, finetune_steps=200, lr=1e-4)      # + centroid fine-tuning on data
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import Config, register_config
from ..errors import ConfigError


@register_config
@dataclass(frozen=True)
class WeightSharing(Config):
    """k-means weight sharing per layer (Han et al., "Deep Compression", ICLR 2016, sec. 3).

    bits: 2^bits centroids per layer (pruned zeros stay exactly zero and are not clustered).
    init: centroid initialisation, ``"linear"`` (evenly spaced over [min, max], the paper's best)
    or ``"density"`` (quantiles of the weights).
    iters: Lloyd iterations. finetune_steps / lr: centroid fine-tuning with gradient sharing
    (Adam on the centroids only) when ``share_`` gets data.

    >>> WeightSharing(bits=4).describe()
    'k-means 4-bit'
    """

    verb: ClassVar[str] = "share"

    bits: int = 4
    init: str = "linear"
    iters: int = 30
    finetune_steps: int = 0
    lr: float = 1e-4

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"WeightSharing: bits must be an integer in [1, 8] (2^bits centroids), "
                              f"got {self.bits!r}")
        if self.init not in ("linear", "density"):
            raise ConfigError(f"WeightSharing: init must be 'linear' or 'density', got {self.init!r}")
        if not isinstance(self.iters, int) or not 0 <= self.iters <= 1000:
            raise ConfigError(f"WeightSharing: iters must be an integer in [0, 1000], got {self.iters!r}")
        if not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            raise ConfigError(f"WeightSharing: finetune_steps must be an integer >= 0 (0 = no fine-tuning), "
                              f"got {self.finetune_steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"WeightSharing: lr must be > 0, got {self.lr!r}")

    def describe(self) -> str:
        return f"k-means {self.bits}-bit" + (f" +ft{self.finetune_steps}" if self.finetune_steps else "")
