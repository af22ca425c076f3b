"""Shrinkage of a layer's calibration Hessian toward its diagonal, H' = (1 - l) H + l diag(H).

Two ways to choose the intensity l, both from the calibration data alone:

* Schaefer & Strimmer's analytic estimate from the spread of the per-sample Hessians
  (:func:`shrinkage_intensity`), used when H has more calibration rows than columns;
* a held-out choice when H is singular (fewer rows n than columns: directions no calibration
  token excites exist, and GPTQ is free to push its rounding error there): the samples are split
  into two folds, and a selector chosen by the caller (``auto_shrinkage(select=...)``, GPTQ's:
  :func:`brainsurgeon.obs.heldout.select_shrinkage`) solves on one fold's H and scores the loss on
  the other's (:func:`fold_hessians`).

    >>> with auto_shrinkage(lambda name: True) as applied:
    ...     run_layerwise(model, names, calib, solve, options)
    >>> applied        # [(layer, lambda), ...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

SPREAD_COLUMNS = 128  # auto shrinkage estimates its intensity from the pairs of this many columns
HELDOUT_RATIO = 1.0  # held-out choice while calibration rows n < HELDOUT_RATIO * columns (H singular)

# select(layer name, module, [(H_fit, H_out), ...], Schaefer-Strimmer lambda) -> the lambda to apply
Select = Callable[[str, nn.Module, list[tuple[torch.Tensor, torch.Tensor]], float], float]


@dataclass
class ShrinkContext:
    """What :func:`auto_shrinkage` hands the accumulators: which layers, the held-out selector, the log."""

    wants: Callable[[str], bool]
    select: Select | None = None
    applied: list[tuple[str, float]] = field(default_factory=list)


_SHRINK: ContextVar[ShrinkContext | None] = ContextVar("hessian_shrinkage", default=None)


def current() -> ShrinkContext | None:
    """The active :func:`auto_shrinkage` context, or None."""
    return _SHRINK.get()


@contextmanager
def auto_shrinkage(wants: Callable[[str], bool], select: Select | None = None
                   ) -> Iterator[list[tuple[str, float]]]:
    """While active, accumulators of layers with ``wants(name)`` shrink their H toward diag(H).

    The intensity is estimated from the calibration samples themselves and applied once, when
    ``acc.H`` is first read: Schaefer-Strimmer's (:func:`shrinkage_intensity`), or, with a
    ``select`` callback and a singular H (rows < columns), the one ``select`` picks on two folds
    of the samples. The yielded list collects ``(layer, lambda)`` for the report.

    >>> with auto_shrinkage(lambda name: True) as applied:
    ...     run_layerwise(model, names, calib, solve, options)
    """
    ctx = ShrinkContext(wants, select)
    token = _SHRINK.set(ctx)
    try:
        yield ctx.applied
    finally:
        _SHRINK.reset(token)


def shrinkage_intensity(H: torch.Tensor, m: int, sum_sq: float) -> float:
    """Schaefer & Strimmer's optimal intensity toward the diagonal (target "D", 2005, Table 1).

    ``H`` is the mean of m per-sample Hessians H_b (one calibration sequence / image each) and
    ``sum_sq = sum_b sum_{i != j} (H_b)_ij^2``. With Var(h_ij) the variance of the mean,
    ``lambda* = sum_{i != j} Var(h_ij) / sum_{i != j} h_ij^2`` clipped to [0, 1] minimises the
    expected Frobenius error of ``(1 - lambda) H + lambda diag(H)`` (Ledoit & Wolf, 2004). Samples
    are whole sequences, so the token-to-token correlation inside a sequence and the spread between
    documents both count as noise.

    >>> shrinkage_intensity(torch.eye(3), 8, 0.0)   # no off-diagonal signal: all diagonal
    1.0
    """
    if m < 2:
        return 0.0
    H64 = H.double()
    off = float(H64.square().sum() - H64.diagonal().square().sum())
    if off <= 0.0:
        return 1.0
    var = max(sum_sq / m - off, 0.0) / (m - 1)  # sum_{i != j} of the variance of the mean
    return min(var / off, 1.0)


def fold_hessians(H: torch.Tensor, n: int, X_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two folds' Hessians as ``[(H_A, H_B), (H_B, H_A)]`` (fit on the first, score on the second).

    ``H = 2/n sum x x^T`` over all n rows; ``X_out`` (n_B, cols) holds fold B's rows, so
    ``H_B = 2/n_B X_B^T X_B`` and ``H_A = (n H - n_B H_B) / (n - n_B)``, in float64.

    >>> X = torch.randn(6, 3); H = 2 / 6 * X.T @ X
    >>> (HA, HB), _ = fold_hessians(H, 6, X[3:])     # HA = 2/3 X[:3]^T X[:3]
    """
    nB = X_out.shape[0]
    XB = X_out.double()
    HB = (2.0 / nB) * XB.t() @ XB
    HA = (n * H.double() - nB * HB) / (n - nB)
    HA = 0.5 * (HA + HA.t())  # symmetric to round-off
    return [(HA, HB), (HB, HA)]
