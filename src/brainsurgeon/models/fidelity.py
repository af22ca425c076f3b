"""How close a compressed classifier stays to its dense original on a test set, beyond accuracy.

When every method reaches the same accuracy (360 digits test images: 4-bit methods all at 99.44 %,
a 95 % interval of about +-0.8 points), accuracy cannot rank them. Two finer measures can:

- **agreement**: the fraction of test inputs whose top-1 class equals the dense model's;
- **KL**: the mean KL(p_dense || p_model) of the softmax outputs (nats), 0 for an identical model.

The accuracy's 95 % Wilson score interval says how far apart two accuracies must be to mean anything.

    >>> f = fidelity(dense, compressed, test_ds)
    >>> f.accuracy, f.ci, f.agreement, f.kl
    (0.9944, (0.980, 0.998), 0.9972, 0.0041)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class Fidelity:
    """Accuracy with its 95 % interval, top-1 agreement with the reference, mean KL(reference || model)."""

    accuracy: float
    ci: tuple[float, float]
    agreement: float
    kl: float
    n: int


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of a proportion k / n.

    >>> wilson_interval(358, 360)
    (0.9799..., 0.9985...)
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@torch.no_grad()
def fidelity(reference: nn.Module, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> Fidelity:
    """Compare `model` with `reference` on (x, y) pairs, both in eval mode (modes restored afterwards).

    >>> fidelity(dense, compressed, test_ds).agreement
    0.9972
    """
    modes = (reference.training, model.training)
    correct = agree = n = 0
    kl = 0.0
    try:
        reference.eval()
        model.eval()
        dev_r = next(reference.parameters()).device
        dev_m = next(iter(model.state_dict().values())).device
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            lr = reference(x.to(dev_r)).float().cpu()
            lm = model(x.to(dev_m)).float().cpu()
            pred = lm.argmax(1)
            correct += int((pred == y).sum())
            agree += int((pred == lr.argmax(1)).sum())
            pr = torch.log_softmax(lr, 1)
            kl += float((pr.exp() * (pr - torch.log_softmax(lm, 1))).sum())
            n += len(y)
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    if n == 0:
        raise ValueError("fidelity: the data set is empty; pass a data set of (x, y) pairs")
    return Fidelity(correct / n, wilson_interval(correct, n), agree / n, kl / n, n)
