"""The layer-wise driver: decides when each layer is solved and which inputs built its Hessian.

The caller passes ``solve(name, module, H)``, which compresses the module's weight in place.

* ``mode="dense"`` (OBC): every Hessian from the dense model in one pass, then every solve.
* ``mode="sequential"`` (GPTQ): layers in execution order; each Hessian is collected with the
  earlier layers already compressed. Inside ``nn.Sequential`` parts (chains) the inputs are cached
  once and replayed child by child, so the cost is linear in depth; layers outside every chain
  use forwards from the model input that stop early at the layer. A chain whose cache would pass
  ``CalibOptions.replay_cache_mb`` falls back to those forwards (with a note).
* ``blocks="model.layers"``: block by block over cached block inputs (one pass over the data).
  Sequential: every Hessian of a block from one forward over its inputs, then one forward of the
  compressed block makes the next block's inputs (``true_sequential=True``: one forward per group
  of layers, each seeing the block's earlier groups compressed). ``offload=True`` keeps only the
  current block on the compute device (the inputs' device).

Lengths and vocabulary: for a bidirectional model calibrated on tokenizer batches, short prefixes of the
samples (``CalibOptions.short_prefixes``) and single-token inputs of seeded vocabulary tokens
(``CalibOptions.vocab_inputs``, :mod:`~brainsurgeon.calib.vocab`) are added first
(:func:`~brainsurgeon.calib.lengths.mix_calibration`; causal models get none: a prefix's activations are
already the first positions of its sample's). Each kind gets a fixed share of every Hessian's trace
(``CalibOptions.regime_shares``, :mod:`~brainsurgeon.calib.regimes`).

Padding: a batch with a 2-D ``attention_mask`` keyword contributes only its real tokens' rows to the
Hessians of layers whose input is (B, T, ...) with that (B, T) (:func:`~brainsurgeon.calib.padding.token_masks`).

The modules, one way: ``forwards`` (forward primitives) <- ``order`` (execution order) <- ``passes``
(dense / sequential passes) <- ``replay`` (chains) and ``blocks`` (block mode) <- ``driver`` (this
entry point); ``vocab`` and ``regimes`` <- ``lengths`` (the mix) <- ``driver`` and ``mixed`` (the same feed
for callers holding ``capture_hessians``).

    >>> def solve(name, module, H):
    ...     set_weight_matrix_(module, my_solver(weight_matrix(module), H))
    >>> run_layerwise(model, ["fc1", "fc2"], loader, solve, CalibOptions(mode="sequential"))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..config import CalibOptions
from .blocks import _run_blocks
from .data import Batch, cache_batches, is_one_shot, iter_batches, model_device, move_to
from .forwards import Solve
from .hessian import check_hessian_memory, resolve_layers
from .lengths import mix_calibration
from .order import execution_order
from .padding import record_mask, token_masks
from .passes import _solve_dense
from .regimes import regime_shares
from .replay import _solve_replay

__all__ = ["execution_order", "run_layerwise"]

log = get_logger(__name__)


def run_layerwise(model: nn.Module, names: list[str], calib: Any, solve: Solve,
                  options: CalibOptions) -> list[str]:
    """Collect each named layer's Hessian from `calib` and call ``solve(name, module, H)``.

    H is float32 by default (``options.hessian_dtype``), (cols, cols) or (g, cols, cols) for
    grouped convs. Runs under ``torch.no_grad()`` in eval mode; hooks and train/eval modes are
    restored on exit, also on error. See the module docstring for the modes. Hessian memory is
    estimated first (:func:`~brainsurgeon.calib.hessian.check_hessian_memory`); returns its notes,
    the length and vocabulary mix's (``options.short_prefixes``, ``vocab_inputs``, ``regime_shares``) and
    those of sequential replays that fell back to forwards from the model input (``options.replay_cache_mb``).

    >>> run_layerwise(model, ["fc1", "fc2"], loader, solve, CalibOptions(mode="dense"))
    >>> run_layerwise(llm, names, loader, solve, CalibOptions(blocks="model.layers", offload=True))
    """
    layers = resolve_layers(model, names)
    if not layers:
        return []
    resident = options.mode == "dense" and not options.blocks
    dtype, notes = check_hessian_memory(layers, getattr(torch, options.hessian_dtype), resident)
    notes = list(notes)
    for note in notes:
        log.warning(note)
    mixed, labels, mix_notes = mix_calibration(model, calib, options)
    limit = 0 if mixed is not calib else options.max_batches  # the mix holds the first max_batches already
    calib, notes = mixed, notes + mix_notes
    for note in mix_notes:
        log.info(note)
    if not options.blocks and is_one_shot(calib) and options.mode == "sequential":
        calib = cache_batches(calib, limit)  # sequential mode reads the data many times
    if options.offload and not options.blocks:
        log.warning("CalibOptions.offload=True has no effect without CalibOptions.blocks")
    dev = None if (options.blocks and options.offload) else model_device(model)

    def batches() -> Iterable[Batch]:
        for i, b in enumerate(iter_batches(calib, limit)):
            record_mask(masks, i, b[1])  # batch i's padding mask (token_masks, below)
            yield move_to(b, dev)

    with (eval_mode(model), torch.no_grad(), token_masks() as masks,
          regime_shares(labels or [], options.regime_shares)):
        if options.blocks:
            _run_blocks(model, layers, batches, solve, options, dtype)
        elif options.mode == "dense":
            _solve_dense(model, layers, batches, solve, dtype)
        else:
            notes += _solve_replay(model, layers, batches, solve, dtype, options.replay_cache_mb * 2**20)
    return notes
