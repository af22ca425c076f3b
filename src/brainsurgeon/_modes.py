"""Train/eval flags: run a block in eval mode and give every submodule its own flag back.

``was = model.training; model.eval(); ...; model.train(was)`` sets *one* flag on every submodule
afterwards, so a model with mixed flags (a frozen BatchNorm in eval inside a training model) comes
back changed; and without ``finally`` an error leaves it in eval. This does neither.

    >>> with eval_mode(model):
    ...     model(x)
    >>> with eval_mode(student, teacher):      # several models at once
    ...     ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with `models` in eval mode; on exit, also on error, give every submodule its own
    train/eval flag back (``model.train()`` would set one flag on all of them)."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
