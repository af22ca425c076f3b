"""Collect what the data-driven criteria need, in one pass over the calibration data.

* ``grads`` / ``fisher``: mean gradient and mean squared gradient (empirical Fisher) of every
  parameter named by a group, under cross-entropy with the batch's labels when it carries
  integer labels, else with the model's own argmax predictions (self-labels);
* ``hessians``: the layer-input Hessian ``H = 2 X X^T / n`` of every consumer layer, from the compression
  driver's feed (``calib.mixed``: padding tokens left out, an encoder's length and vocabulary mix), so
  OBS importance ranks channels by the H the OBS solvers use;
* ``apoz``: the fraction of zero inputs per input channel of every consumer layer (padding tokens left out).

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

from .._log import get_logger
from .._modes import eval_mode
from ..calib import move_to
from ..calib.data import cache_batches, eval_forwards, is_one_shot, model_device, to_args_kwargs
from ..calib.hessian import first_input
from ..calib.mixed import mixed_hessians
from ..calib.padding import real_rows
from ..config import CalibOptions
from ..errors import CalibrationError
from .importance import Stats, _key, consumers, is_param

log = get_logger(__name__)

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


def _hessian_stats(model: nn.Module, names: list[str], calib: Any, options: CalibOptions | None, stats: Stats,
                   max_batches: int = 0) -> None:
    """The consumers' H as the compression driver builds it (``calib.mixed``: padding left out, an encoder's
    length and vocabulary mix); the mix's notes go to ``stats.notes`` and the log."""
    stats.hessians, notes = mixed_hessians(model, {n: model.get_submodule(n) for n in names}, calib, options,
                                           max_batches)
    for note in notes:
        log.info("pruning statistics: %s", note)
    stats.notes += [f"pruning statistics: {note}" for note in notes]


def _apoz_stats(model: nn.Module, names: list[str], calib: Any, max_batches: int, stats: Stats) -> None:
    """Fraction of zero inputs per input channel, over the calibration data as given less its padding tokens."""
    zeros: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module) -> Any:
        conv = isinstance(mod, nn.modules.conv._ConvNd)

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_input(args, kwargs).detach()
            ch = x.movedim(1, -1) if conv else real_rows(x)  # channels last; a Linear's padding rows out
            z = (ch == 0).reshape(-1, ch.shape[-1]).float()  # (positions, C)
            zeros[name] = zeros.get(name, 0) + z.sum(0)
            counts[name] = counts.get(name, 0) + z.shape[0]
        return hook

    try:
        for name in names:
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_pre_hook(make_hook(name, mod), with_kwargs=True))
        eval_forwards(model, calib, max_batches)
    finally:
        for h in handles:
            h.remove()
    stats.apoz = {n: zeros[n] / counts[n] for n in zeros}


def collect_stats(model: nn.Module, groups: list[Any], needs: Iterable[str], calib: Any,
                  max_batches: int = 0, *, options: CalibOptions | None = None) -> Stats:
    """Collect the statistics `needs` (subset of grads, fisher, hessians, apoz) for `groups`.

    Hessians are fed as the compression driver feeds them (:func:`~brainsurgeon.calib.mixed.mixed_forwards`
    with `options`, default ``CalibOptions()``, its ``max_batches`` replaced by `max_batches` when non-zero):
    padding tokens left out, an encoder's calibration mixed with short prefixes and vocabulary singles.
    APoZ counts the calibration data as given, less its padding tokens.

    >>> stats = collect_stats(model, graph.groups(), ("grads",), loader, max_batches=8)
    >>> collect_stats(bert, groups, ("hessians",), batches, options=CalibOptions(vocab_inputs=0)).hessians
    """
    needs = tuple(needs)
    stats = Stats(model)
    if not needs:
        return stats
    with eval_mode(model):
        if {"grads", "fisher"} & set(needs):
            _grad_stats(model, groups, calib, max_batches, stats)
        if {"hessians", "apoz"} & set(needs):
            if calib is None:
                raise CalibrationError(_EMPTY + " (got calib=None)")
            names = sorted({name for g in groups for name, _ in consumers(g, model)})
            if not names:   # no group has a consumer layer: nothing to collect, no forward to run
                return stats
            if {"hessians", "apoz"} <= set(needs) and is_one_shot(calib):
                calib = cache_batches(calib, max_batches)  # two passes read it
        if "hessians" in needs:
            _hessian_stats(model, names, calib, options, stats, max_batches)
        if "apoz" in needs:
            _apoz_stats(model, names, calib, max_batches, stats)
    return stats
