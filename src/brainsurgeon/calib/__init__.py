"""Calibration: data handling, layer-input Hessians, the layer-wise driver and re-calibration.

    >>> from brainsurgeon.calib import capture_hessians, run_layerwise
    >>> with capture_hessians(model, ["fc1"]) as hs:
    ...     model(x)
    >>> hs["fc1"].H                  # 2/n * X X^T, float64

Leaf package: depends on torch and the package's errors/config/logging only.
"""

from .data import CachedBatches, cache_batches, iter_batches, move_to, prepare_calibration
from .driver import execution_order, run_layerwise
from .hessian import (
    HessianAccumulator,
    auto_shrinkage,
    capture_hessians,
    capture_layers,
    layer_columns,
    num_columns,
    num_groups,
    resolve_layers,
    set_weight_matrix_,
    supported,
    weight_matrix,
)
from .lengths import is_causal, mix_calibration, mix_lengths, short_prefixes
from .mixed import mixed_forwards, mixed_hessians
from .recalib import correct_bias_, correct_mean_std_, reestimate_batchnorm_
from .regimes import regime_shares
from .vocab import vocab_ids

__all__ = [
    "CachedBatches", "HessianAccumulator", "auto_shrinkage", "cache_batches", "capture_hessians", "capture_layers",
    "correct_bias_", "correct_mean_std_", "execution_order", "is_causal", "iter_batches", "layer_columns",
    "mix_calibration", "mix_lengths", "mixed_forwards", "mixed_hessians", "move_to", "num_columns", "num_groups",
    "prepare_calibration",
    "reestimate_batchnorm_", "regime_shares", "resolve_layers", "run_layerwise", "set_weight_matrix_",
    "short_prefixes", "supported", "vocab_ids", "weight_matrix",
]
