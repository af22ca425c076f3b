"""Distillation and structure-preserving fine-tuning: Hinton KD, FitNets hints, QAT, one loop.

    >>> from brainsurgeon.distill import KD, distill
    >>> hist = distill(pruned, dense, train_ds, KD(temperature=4.0, alpha=0.9, epochs=2), val=val_ds)
    >>> print(hist.to_table())
"""

from .augment import shift_flip
from .config import KD
from .hints import ChannelAdapter, HintHooks
from .history import DistillHistory, Period
from .loop import distill, evaluate_metric
from .losses import hint_loss, hinton_loss, kd_loss
from .structure import apply_masks_, masked_gradients, zero_masks

__all__ = [
    "KD", "ChannelAdapter", "DistillHistory", "HintHooks", "Period", "apply_masks_", "distill",
    "evaluate_metric", "hint_loss", "hinton_loss", "kd_loss", "masked_gradients", "shift_flip", "zero_masks",
]
