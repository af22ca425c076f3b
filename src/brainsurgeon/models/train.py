"""A minimal, deterministic training loop and an accuracy evaluator for the built-in models.

    >>> from brainsurgeon.models import build_model, load_digits_splits
    >>> train_ds, test_ds = load_digits_splits()
    >>> model = train(build_model("digits-cnn", seed=0), train_ds, epochs=10, lr=3e-3)
    >>> evaluate(model, test_ds) > 0.97
    True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._log import get_logger, progress
from .._modes import eval_mode
from ..distill.augment import shift_flip
from ..errors import ConfigError

log = get_logger(__name__)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train(model: nn.Module, dataset: Dataset, epochs: int = 10, lr: float = 3e-3,
          batch_size: int = 64, seed: int = 0, shift: int = 0, flip: bool = False) -> nn.Module:
    """Train `model` in place on (x, y) pairs with Adam, a one-cycle LR schedule and cross-entropy.

    shift, flip: augment every image batch by a random translation of up to `shift` pixels and
    a random left-right mirror (:func:`brainsurgeon.distill.shift_flip`, the views KD uses).
    Deterministic given `seed` (shuffle order, augmentation and any randomness in the forward),
    without changing the caller's global RNG state. Batches go to the device of the model's
    parameters. Returns the same model, left in eval mode.

    >>> model = train(build_model("digits-cnn", seed=0), train_ds, epochs=1)
    >>> model = train(build_model("fashion-cnn", seed=0), train_ds, epochs=30, shift=2, flip=True)
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or shift < 0:
        raise ConfigError(f"train: epochs and batch_size must be >= 1, lr > 0 and shift >= 0, "
                          f"got epochs={epochs}, batch_size={batch_size}, lr={lr}, shift={shift}")
    device = _device_of(model)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=False)
    steps = epochs * len(loader)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25) if steps >= 8
             else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))  # one-cycle needs >= 2 warm-up steps

    def batches() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for epoch in range(epochs):
            for x, y in loader:
                yield epoch, x, y

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        loss_sum, n_seen, last_epoch = 0.0, 0, 0
        for epoch, x, y in progress(batches(), desc="train", total=steps):
            if epoch != last_epoch:
                log.info("epoch %d: train loss %.4f", last_epoch + 1, loss_sum / max(n_seen, 1))
                loss_sum, n_seen, last_epoch = 0.0, 0, epoch
            x, y = x.to(device), y.to(device)
            if shift or flip:
                x = shift_flip(x, shift, flip)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            n_seen += len(y)
        log.info("epoch %d: train loss %.4f", last_epoch + 1, loss_sum / max(n_seen, 1))
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on (x, y) pairs, in eval mode; the model's mode is restored.

    >>> evaluate(model, test_ds)
    0.9805...
    """
    device = _device_of(model)
    correct = total = 0
    with eval_mode(model):
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    if total == 0:
        raise ConfigError("evaluate: the data set is empty; pass a data set of (x, y) pairs")
    return correct / total
