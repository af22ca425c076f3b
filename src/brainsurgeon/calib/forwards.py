"""The driver's forward primitives: a forward that a hook may end early, and the solve callback's type.

    >>> stopped, out = _forward(model, ((x,), {}))      # stopped: a hook raised _StopForward
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError
from .data import Batch

Solve = Callable[[str, nn.Module, torch.Tensor], None]
Batches = Callable[[], Iterable[Batch]]


class _StopForward(Exception):
    """Raised inside a hook to end a forward early; always caught by the driver."""


def _forward(root: nn.Module, batch: Batch) -> tuple[bool, Any]:
    """Run ``root(*args, **kwargs)``; returns (stopped early, output)."""
    args, kwargs = batch
    try:
        return False, root(*args, **kwargs)
    except _StopForward:
        return True, None


def _unreached(names: list[str]) -> CalibrationError:
    return CalibrationError(f"layer(s) {names} were never reached by the calibration data; check that calib "
                            f"feeds the model's forward (and these layers' branches), or pass ignore={names}")
