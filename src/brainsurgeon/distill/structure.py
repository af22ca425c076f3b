"""Structure that fine-tuning must preserve: zero masks of sparse weights and parameter shapes.

Pruned channels are physically gone (smaller tensors), so they stay gone as long as shapes do;
unstructured / N:M / block zeros are kept by masking the gradients and re-applying the mask
after every optimizer step (weight decay and momentum cannot revive them)::

    >>> masks = zero_masks(model)              # {param name: bool tensor, True where w == 0}
    >>> with masked_gradients(model, masks):
    ...     loss.backward(); opt.step(); apply_masks_(model, masks)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import BrainsurgeonError, ConfigError


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: mask} for every weight (a parameter with >= 2 dims) holding exact zeros; mask is
    True where the weight is zero.

    >>> lin = nn.Linear(4, 2); lin.weight.data[0, :2] = 0
    >>> zero_masks(lin)["weight"].sum()
    tensor(2)
    """
    out = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.requires_grad:
            m = p.detach() == 0
            if bool(m.any()):
                out[name] = m
    return out


def _params(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    bad = [n for n in masks if n not in params or params[n].shape != masks[n].shape]
    if bad:
        raise ConfigError(f"masks for {bad} do not match the model's parameters (name or shape); "
                          f"compute them with zero_masks(model) on this model")
    return {n: params[n] for n in masks}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set every masked entry back to zero (in place)."""
    for n, p in _params(model, masks).items():
        p.masked_fill_(masks[n].to(p.device), 0.0)


@contextmanager
def masked_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, gradients of masked entries are zero (tensor hooks, removed on exit)."""
    handles = []
    try:
        for n, p in _params(model, masks).items():
            m = masks[n].to(p.device)
            handles.append(p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0)))
        yield
    finally:
        for h in handles:
            h.remove()


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter and buffer."""
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def check_structure(model: nn.Module, before: dict[str, tuple[int, ...]],
                    masks: dict[str, torch.Tensor]) -> None:
    """Raise if a shape changed or a masked weight is non-zero (an internal invariant)."""
    now = shapes(model)
    changed = [n for n in before if n in now and now[n] != before[n]]
    if changed:
        raise BrainsurgeonError(f"parameter shapes changed during fine-tuning: {changed}")
    params = dict(model.named_parameters())
    revived = [n for n, m in masks.items() if bool(params[n].detach()[m.to(params[n].device)].any())]
    if revived:
        raise BrainsurgeonError(f"pruned weights became non-zero during fine-tuning: {revived}")
