"""The driver's calibration feed for callers that hold their own Hessian hooks (``capture_hessians``).

:func:`~brainsurgeon.calib.driver.run_layerwise` adds the length mix and the vocabulary singles to an
encoder's calibration (:func:`~brainsurgeon.calib.lengths.mix_calibration`), keeps padding rows out of H
(``calib.padding``) and gives each kind of input its share of H's trace (``calib.regimes``). Code that
captures Hessians itself (``share.hessian_sensitivity``, the search database, ``prune.collect_stats``)
gets the same Hessians by running its forwards with :func:`mixed_forwards` instead of a plain loop:

    >>> with capture_hessians(model, names) as hs:
    ...     notes = mixed_forwards(model, calib, CalibOptions())
    >>> hs["encoder.layer.0.attention.self.query"].H      # = run_layerwise(mode="dense")'s H

On a CNN, on float features and on a causal decoder the mix adds nothing (``mix_calibration`` returns the
data as it is), so the Hessians equal a plain loop's bit for bit when no batch is padded. Activation
statistics (observer ranges, SmoothQuant / equalization maxima) read the data as given, less its padding
(:func:`~brainsurgeon.calib.data.eval_forwards`): the mix is a weighting of H's trace, which a range has not.

What a cache of such Hessians must key on, beside the data, is :func:`feed_key`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

from ..config import CalibOptions
from .data import eval_forwards
from .hessian import capture_layers
from .lengths import mix_calibration
from .regimes import paused, regime_shares

__all__ = ["FEED_VERSION", "HESSIAN_OPTIONS", "feed_key", "mixed_forwards", "mixed_hessians"]

# 1: a plain loop over the batches (every row, padding included); 2: padding rows left out of H and of the
# activation statistics (eval_forwards), the length and vocabulary mix for bidirectional models, regime shares
# of H's trace. Raise it when the feed changes what it gives.
FEED_VERSION = 2
# the CalibOptions fields mixed_forwards reads (each changes H on some model)
HESSIAN_OPTIONS = ("max_batches", "short_prefixes", "vocab_inputs", "vocab_seed", "regime_shares")


def feed_key(options: CalibOptions) -> str:
    """What decides :func:`mixed_forwards`' Hessians beside the data and the model: the feed's version and the
    CalibOptions fields it reads, as a canonical string (for cache keys, e.g. the search database's).

    >>> feed_key(CalibOptions(vocab_inputs=0))
    '{"feed": 2, "max_batches": 0, "regime_shares": [0.5, 0.25, 0.25], "short_prefixes": [1, 2, 3, 4], ...}'
    """
    return json.dumps({"feed": FEED_VERSION, **{f: getattr(options, f) for f in HESSIAN_OPTIONS}}, sort_keys=True)


def mixed_forwards(model: nn.Module, calib: Any, options: CalibOptions | None = None) -> list[str]:
    """Run `model` (eval mode, no grad; train/eval flags given back) over `calib` as the driver feeds it:
    mixed (``options.short_prefixes``, ``vocab_inputs``), with each batch's padding mask and regime set for
    the accumulators of the caller's ``capture_hessians``. Returns the mix's notes."""
    options = options or CalibOptions()
    with paused():  # the mix's causality probe must not reach the caller's Hessians
        data, labels, notes = mix_calibration(model, calib, options)
    limit = 0 if data is not calib else options.max_batches  # the mix holds the first max_batches already
    with regime_shares(labels or [], options.regime_shares):
        eval_forwards(model, data, limit)
    return notes


def mixed_hessians(model: nn.Module, layers: dict[str, nn.Module], calib: Any, options: CalibOptions | None = None,
                   max_batches: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({name: H}, the mix's notes)`` of `layers` (``{name: module}``) over `calib` fed by
    :func:`mixed_forwards`; a non-zero `max_batches` replaces ``options.max_batches``.

    >>> Hs, notes = mixed_hessians(bert, {"encoder.layer.0.output.dense": mod}, batches)
    """
    options = options or CalibOptions()
    if max_batches:
        options = dataclasses.replace(options, max_batches=max_batches)
    with capture_layers(layers) as accs:
        notes = mixed_forwards(model, calib, options)
    return {n: a.H for n, a in accs.items()}, notes
