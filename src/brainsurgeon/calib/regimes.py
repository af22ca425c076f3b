"""Calibration regimes with fixed shares of each Hessian's trace.

The driver's calibration can hold batches of different kinds (regimes): the caller's samples (0), short
prefixes of them (1, :func:`~brainsurgeon.calib.lengths.short_prefixes`) and single-token inputs of the
model's vocabulary (2, :func:`~brainsurgeon.calib.vocab.vocab_singles`). Counted token by token, the
regime with the most rows would decide H: 1,024 vocabulary singles (3,072 rows) would drown 16 sentences
(462 rows), and 16 prefixes would barely register. With :func:`regime_shares` active, every
:class:`~brainsurgeon.calib.hessian.HessianAccumulator` keeps each regime's ``H_r = 2/n_r sum x x^T`` apart
and returns

    H = (sum_r n_r tr H_r / n) * sum_r s_r H_r / tr H_r / sum_r s_r

over the regimes present: regime r holds the share ``s_r / sum s`` of H's trace, and H's trace is that of
the plain row average (so damping, shrinkage and the solvers' losses keep their scale). Batches arrive
regime by regime (the driver orders them so), so an accumulator holds at most two matrices: the finished
regimes' weighted sum and the running one.

    >>> with token_masks() as masks, regime_shares([0, 0, 2], (0.5, 0.25, 0.25)):
    ...     run the forwards of batches 0, 1, 2 under batch_index(i)    # H: half sentences, half vocabulary
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from .padding import _INDEX

__all__ = ["HELDOUT", "REGIMES", "calibration_mixed", "current_batch", "current_regime", "paused", "regime_shares"]

REGIMES = ("calibration samples", "short prefixes", "vocabulary singles",
           "held-out vocabulary singles")  # regime index -> name
HELDOUT = 3  # the held-out regime: forwarded, never in H (share 0; calib.heldout captures its inputs)

# while the driver runs with shares: (regime of batch i, share of regime r)
_REGIME: ContextVar[tuple[Sequence[int], tuple[float, ...]] | None] = ContextVar("calib_regimes", default=None)
_PAUSED: ContextVar[bool] = ContextVar("calib_hessians_paused", default=False)


@contextmanager
def paused() -> Iterator[None]:
    """While active, accumulators ignore their inputs (a probe forward inside a caller's capture_hessians)."""
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


def is_paused() -> bool:
    """Whether accumulators ignore the batch being forwarded: :func:`paused` is active, or the batch is of the
    held-out regime (:data:`HELDOUT`: in no H; ``calib.heldout`` captures its inputs)."""
    if _PAUSED.get():
        return True
    state, i = _REGIME.get(), _INDEX.get()
    return state is not None and 0 <= i < len(state[0]) and int(state[0][i]) == HELDOUT


@contextmanager
def regime_shares(labels: Sequence[int], shares: tuple[float, ...]) -> Iterator[None]:
    """While active, the forward of batch i (``padding.batch_index(i)``) belongs to regime ``labels[i]``,
    whose rows get the share ``shares[labels[i]]`` of every Hessian's trace (see the module docstring).
    `labels` may be a list the driver fills as it reads the batches."""
    token = _REGIME.set((labels, shares))
    try:
        yield
    finally:
        _REGIME.reset(token)


def current_regime() -> tuple[int, float] | None:
    """(regime, share) of the batch being forwarded, or None outside :func:`regime_shares` / a batch, and
    with no shares (every row counts alike). A regime past the given shares (:data:`HELDOUT`) has share 0:
    its rows are kept out of H."""
    state, i = _REGIME.get(), _INDEX.get()
    if state is None or not state[1] or not 0 <= i < len(state[0]):
        return None
    r = int(state[0][i])
    return r, float(state[1][r]) if r < len(state[1]) else 0.0


def current_batch() -> int:
    """The index of the calibration batch being forwarded (``padding.batch_index``), -1 outside one."""
    return _INDEX.get()


def calibration_mixed() -> bool:
    """Whether the running driver's calibration holds regimes beside the caller's samples (prefixes or
    vocabulary singles: the model was found bidirectional, :func:`~brainsurgeon.calib.lengths.mix_calibration`)."""
    state = _REGIME.get()
    return state is not None and any(0 < r < HELDOUT for r in state[0])
