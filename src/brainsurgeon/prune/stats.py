"""Collect what the data-driven criteria need, in one pass over the calibration data.

* ``grads`` / ``fisher``: mean gradient and mean squared gradient (empirical Fisher) of every
  parameter named by a group, under cross-entropy with the batch's labels when it carries
  integer labels, else with the model's own argmax predictions (self-labels);
* ``hessians``: the layer-input Hessian ``H = 2 X X^T / n`` of every consumer layer;
* ``apoz``: the fraction of zero inputs per input channel of every consumer layer.

The model is left as it was: eval mode during collection, then its train/eval mode, grads
and ``requires_grad`` flags restored, hooks removed (also on error).

    >>> stats = collect_stats(model, groups, ("hessians",), calib)
    >>> stats.hessians["conv2"].shape
    torch.Size([144, 144])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import eval_mode
from ..calib import capture_layers, move_to
from ..calib.data import model_device, to_args_kwargs
from ..calib.hessian import first_input
from ..errors import CalibrationError
from .importance import Stats, _key, consumers, is_param

_EMPTY = ("calibration data is empty; the chosen importance criterion or reconstruction needs it: pass "
          "calib= a DataLoader, a list of tensors or (input, label) pairs")


def raw_batches(calib: Any, max_batches: int = 0) -> Iterator[tuple[tuple[Any, ...], dict[str, Any], Any]]:
    """Yield ``(args, kwargs, labels or None)`` per calibration batch (labels: an int tensor second item)."""
    if calib is None:
        raise CalibrationError(_EMPTY + " (got calib=None)")
    if isinstance(calib, (torch.Tensor, Mapping)):
        calib = [calib]
    elif callable(calib) and not isinstance(calib, Iterable):
        calib = calib()
    count = 0
    for i, batch in enumerate(calib):
        if max_batches and i >= max_batches:
            break
        args, kwargs = to_args_kwargs(batch, i)
        labels = None
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor) \
                and not torch.is_floating_point(batch[1]):
            labels = batch[1]
        elif isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
            labels = batch["labels"]
        count += 1
        yield args, kwargs, labels
    if count == 0:
        raise CalibrationError(_EMPTY)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CalibrationError(f"gradient criteria need the model to return logits (a Tensor, .logits or a "
                           f"tuple starting with one), got {type(out).__name__}; use a data-free criterion")


def self_supervised_loss(out: Any, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the logits (last dim = classes) with `labels`, else with their own argmax."""
    z = _logits(out)
    z = z.reshape(-1, z.shape[-1]).float()  # (..., classes) -> (N, classes)
    y = labels.reshape(-1).to(z.device) if labels is not None and labels.numel() == z.shape[0] \
        else z.detach().argmax(-1)
    return F.cross_entropy(z, y)


def _grad_stats(model: nn.Module, groups: list[Any], calib: Any, max_batches: int,
                stats: Stats) -> None:
    params: dict[str, nn.Parameter] = {}
    for g in groups:
        for s in g.slices:
            if is_param(model, s):
                params[_key(s)] = getattr(model.get_submodule(s.module), s.tensor)
    flags = {k: p.requires_grad for k, p in params.items()}
    every = list(model.parameters())   # backward also writes .grad of parameters outside the groups
    saved_all = [p.grad for p in every]
    saved = {k: p.grad for k, p in params.items()}
    device = model_device(model)
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    sq = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    n = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for args, kwargs, labels in raw_batches(calib, max_batches):
            for p in params.values():
                p.grad = None
            args, kwargs = move_to((args, kwargs), device)
            self_supervised_loss(model(*args, **kwargs), labels).backward()
            for k, p in params.items():
                if p.grad is not None:
                    sums[k] += p.grad.float()
                    sq[k] += p.grad.float().pow(2)
            n += 1
    finally:
        for p, grad in zip(every, saved_all, strict=True):
            p.grad = grad
        for k, p in params.items():
            p.grad = saved[k]
            p.requires_grad_(flags[k])
    stats.grads = {k: v / n for k, v in sums.items()}
    stats.fisher = {k: v / n for k, v in sq.items()}


def _activation_stats(model: nn.Module, names: list[str], calib: Any, max_batches: int,
                      needs: tuple[str, ...], stats: Stats) -> None:
    layers = {n: model.get_submodule(n) for n in names}
    zeros: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_input(args, kwargs).detach()
            ch = x.movedim(1, -1) if isinstance(mod, nn.modules.conv._ConvNd) else x  # channels last
            z = (ch == 0).reshape(-1, ch.shape[-1]).float()  # (positions, C)
            zeros[name] = zeros.get(name, 0) + z.sum(0)
            counts[name] = counts.get(name, 0) + z.shape[0]
        return hook

    device = model_device(model)
    with capture_layers(layers if "hessians" in needs else {}) as accs:
        try:
            if "apoz" in needs:
                for name, mod in layers.items():
                    handles.append(mod.register_forward_pre_hook(make_hook(name, mod), with_kwargs=True))
            with torch.no_grad():
                for args, kwargs, _ in raw_batches(calib, max_batches):
                    args, kwargs = move_to((args, kwargs), device)
                    model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        stats.hessians = {n: a.H for n, a in accs.items()}
    stats.apoz = {n: zeros[n] / counts[n] for n in zeros}


def collect_stats(model: nn.Module, groups: list[Any], needs: Iterable[str], calib: Any,
                  max_batches: int = 0) -> Stats:
    """Collect the statistics `needs` (subset of grads, fisher, hessians, apoz) for `groups`.

    >>> stats = collect_stats(model, graph.groups(), ("grads",), loader, max_batches=8)
    """
    needs = tuple(needs)
    stats = Stats(model)
    if not needs:
        return stats
    with eval_mode(model):
        if {"grads", "fisher"} & set(needs):
            _grad_stats(model, groups, calib, max_batches, stats)
        if {"hessians", "apoz"} & set(needs):
            names = sorted({name for g in groups for name, _ in consumers(g, model)})
            _activation_stats(model, names, calib, max_batches, needs, stats)
    return stats
