"""The driver's calibration feed for callers that hold their own Hessian hooks (``capture_hessians``).

:func:`~brainsurgeon.calib.driver.run_layerwise` adds the length mix and the vocabulary singles to an
encoder's calibration (:func:`~brainsurgeon.calib.lengths.mix_calibration`), keeps padding rows out of H
(``calib.padding``) and gives each kind of input its share of H's trace (``calib.regimes``). Code that
captures Hessians itself (sensitivities, search databases, pruning statistics) gets the same Hessians by
running its forwards with :func:`mixed_forwards` instead of a plain loop:

    >>> with capture_hessians(model, names) as hs:
    ...     notes = mixed_forwards(model, calib, CalibOptions())
    >>> hs["encoder.layer.0.attention.self.query"].H      # = run_layerwise(mode="dense")'s H
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._modes import eval_mode
from ..config import CalibOptions
from .data import iter_batches, model_device, move_to
from .forwards import _forward
from .lengths import mix_calibration
from .padding import batch_index, record_mask, token_masks
from .regimes import paused, regime_shares

__all__ = ["mixed_forwards"]


def mixed_forwards(model: nn.Module, calib: Any, options: CalibOptions | None = None) -> list[str]:
    """Run `model` (eval mode, no grad; train/eval flags given back) over `calib` as the driver feeds it:
    mixed (``options.short_prefixes``, ``vocab_inputs``), with each batch's padding mask and regime set for
    the accumulators of the caller's ``capture_hessians``. Returns the mix's notes."""
    options = options or CalibOptions()
    with paused():  # the mix's causality probe must not reach the caller's Hessians
        data, labels, notes = mix_calibration(model, calib, options)
    limit = 0 if data is not calib else options.max_batches  # the mix holds the first max_batches already
    dev = model_device(model)
    with (eval_mode(model), torch.no_grad(), token_masks() as masks,
          regime_shares(labels or [], options.regime_shares)):
        for i, batch in enumerate(iter_batches(data, limit)):
            record_mask(masks, i, batch[1])
            with batch_index(i):
                _forward(model, move_to(batch, dev))
    return notes
