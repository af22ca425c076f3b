"""Low-rank factorization: plain and activation-aware truncated SVD, Tucker-2 for convs.

    >>> from brainsurgeon.lowrank import LowRank, factorize_
    >>> rep = factorize_(model, LowRank(param_ratio=0.5, activation_aware=True), calib=loader)
    >>> print(rep.to_table())
"""

from .api import (
    RankEntry,
    TuckerEntry,
    factorize_,
    factorize_module,
    plan_factorization,
    rank_entries,
    tucker_entries,
)
from .compact import DepthwiseSeparableConv2d, SpatialSeparableConv2d
from .config import LowRank, Separable
from .modules import LowRankConv2d, LowRankLinear, Tucker2Conv2d
from .separable import SeparableFit, fit_separable
from .svd import Spectrum, choose_rank, decompose, truncate
from .transform import SeparableEntry, plan_transform, separable_entries, transform_, transform_module
from .tucker import choose_tucker_ranks, reconstruct, tucker2

__all__ = [
    "LowRank", "LowRankConv2d", "LowRankLinear", "RankEntry", "Spectrum", "Tucker2Conv2d", "choose_rank",
    "choose_tucker_ranks", "decompose", "factorize_", "factorize_module", "plan_factorization",
    "rank_entries", "reconstruct", "truncate", "tucker2", "TuckerEntry", "tucker_entries",
    # compact-design transforms
    "DepthwiseSeparableConv2d", "Separable", "SeparableFit", "SpatialSeparableConv2d", "fit_separable",
    "plan_transform", "transform_", "transform_module", "SeparableEntry", "separable_entries",
]
