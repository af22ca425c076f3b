"""Inputs that no Hessian sees: the held-out regime's layer inputs, for checks made after a solve.

With ``CalibOptions.heldout_singles`` the driver's mix (:func:`~brainsurgeon.calib.lengths.mix_calibration`)
forwards single-token inputs of vocabulary ids disjoint from the Hessians' own singles as the last regime,
:data:`~brainsurgeon.calib.regimes.HELDOUT`, whose share of every trace is 0: they pass through the model
(through the earlier layers as compressed so far, in sequential mode) but never enter an H. While
:func:`capture_heldout` is active, each named layer keeps the input columns it received from those
batches, the latest forward of each batch only (a sequential driver forwards a batch again after earlier
layers change), until the caller takes them with :meth:`HeldoutInputs.take` (at the layer's solve).

    >>> with capture_heldout({"encoder.layer.0.output.dense": mod}) as held:
    ...     run_layerwise(model, names, calib, solve, CalibOptions(heldout_singles=1024))
    >>> X = held.take("encoder.layer.0.output.dense")   # (rows, cols), or None if no held-out row reached it
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .hessian import first_input, layer_columns
from .regimes import HELDOUT, current_batch, current_regime

__all__ = ["HeldoutInputs", "capture_heldout"]


class HeldoutInputs:
    """Per layer, the held-out regime's input columns by batch (float32, the latest forward of each)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, torch.Tensor]] = {}
        self.taken: set[str] = set()

    def add(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        regime = current_regime()
        if regime is None or regime[0] != HELDOUT or name in self.taken:
            return
        cols = layer_columns(module, x.detach(), name)
        if cols.dim() != 2:  # grouped convs: (g, n, cols); the guard is per layer of one group
            return
        self.rows.setdefault(name, {})[current_batch()] = cols.to(torch.float32, copy=True)

    def take(self, name: str) -> torch.Tensor | None:
        """The layer's held-out input columns (rows, cols), or None; later forwards are ignored."""
        self.taken.add(name)
        parts = self.rows.pop(name, {})
        return torch.cat([parts[i] for i in sorted(parts)]) if parts else None


@contextmanager
def capture_heldout(layers: dict[str, nn.Module]) -> Iterator[HeldoutInputs]:
    """Forward pre-hooks on `layers` that keep the held-out regime's inputs; removed on exit, also on error."""
    held = HeldoutInputs()
    handles = []
    try:
        for name, mod in layers.items():
            def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
                held.add(name, m, first_input(args, kwargs))

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        yield held
    finally:
        for h in handles:
            h.remove()
