"""Padded calibration batches: only the real tokens' rows go into the Hessians.

The driver records each batch's 2-D ``attention_mask`` (:func:`record_mask`) inside
:func:`token_masks` and marks which batch a forward belongs to (:func:`batch_index`); a
:class:`~brainsurgeon.calib.hessian.HessianAccumulator` whose layer input is (B, T, ...) with that
batch's (B, T) keeps only the rows where the mask is set.

    >>> with token_masks() as masks, batch_index(0):
    ...     record_mask(masks, 0, {"attention_mask": am}); acc.add_input(hidden)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

# padding: while the driver runs, masks[i] is batch i's (B, T) bool mask of real tokens (or None), and
# the index of the batch being forwarded; layer inputs shaped (B, T, ...) keep only the real tokens' rows
_MASKS: ContextVar[list[torch.Tensor | None] | None] = ContextVar("calib_token_masks", default=None)
_INDEX: ContextVar[int] = ContextVar("calib_batch_index", default=-1)


@contextmanager
def token_masks() -> Iterator[list[torch.Tensor | None]]:
    """While active, the driver records each batch's padding mask into the yielded list (index = batch).

    Padding positions (``attention_mask == 0``) are not inputs the model is used on: their outputs are
    masked out of attention and pooling, so their rows would only add noise (and directions no real
    token has) to H. Layers reached with a (B, T, ...) input whose (B, T) matches batch i's mask
    accumulate only the real tokens' rows; an input of another shape (a pooled or strided sequence, a
    decoder of another length) keeps every row.

    >>> with token_masks() as masks, batch_index(0):
    ...     masks.append(attention_mask.bool()); acc.add_input(hidden)    # only the real tokens' rows
    """
    token = _MASKS.set([])
    try:
        yield _MASKS.get()
    finally:
        _MASKS.reset(token)


@contextmanager
def batch_index(i: int) -> Iterator[None]:
    """Marks the forward of batch `i` (see :func:`token_masks`)."""
    token = _INDEX.set(i)
    try:
        yield
    finally:
        _INDEX.reset(token)


def record_mask(masks: list[torch.Tensor | None], i: int, kwargs: dict[str, Any]) -> None:
    """masks[i] = the batch's 2-D ``attention_mask`` as bool (None without one)."""
    m = kwargs.get("attention_mask")
    while len(masks) <= i:
        masks.append(None)
    masks[i] = (m != 0) if isinstance(m, torch.Tensor) and m.dim() == 2 else None


def real_rows(x: torch.Tensor) -> torch.Tensor:
    """A token-major layer input without its padding rows: (n_real, ...) when `x` is (B, T, ...) with the
    (B, T) of the current batch's mask (:func:`token_masks`, :func:`batch_index`), else `x` as it is.

    For observers of (B, T, C) inputs (activation ranges, smoothing statistics); a conv's (N, C, L) input
    is not token-major: callers pass only Linear inputs.

    >>> with token_masks() as masks, batch_index(0):
    ...     record_mask(masks, 0, {"attention_mask": am}); real_rows(hidden).shape    # (am.sum(), C)
    """
    m = _current_mask(x)
    return x if m is None else x[m.to(x.device)]


def _current_mask(x: torch.Tensor) -> torch.Tensor | None:
    masks, i = _MASKS.get(), _INDEX.get()
    m = masks[i] if masks is not None and 0 <= i < len(masks) else None
    return m if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape) and not bool(m.all()) else None
