"""Adaptive bit widths: per-layer bits from a sensitivity signal under an average-bits budget.

A layer quantized to b bits over a range R gets weight noise of variance ``R^2 / (12 * 4^b)``
(uniform step ``R / 2^b``). Its predicted loss increase is ``s * R^2 / (12 * 4^b)`` where the
sensitivity s is either

* ``rows * tr(H)`` with the layer-input Hessian H = 2 X X^T / n (the OBS layer loss
  ``tr(dW H dW^T)`` for i.i.d. noise; cf. HAWQ-V2, Dong et al., NeurIPS 2020, which uses the
  trace of the loss Hessian), from :func:`hessian_sensitivity`, or
* ``sum_i g_i^2`` over the weights, the empirical Fisher (squared gradients), from
  :func:`gradient_sensitivity`.

:func:`allocate_bits` then minimises the summed predicted loss subject to
``sum_l params_l * bits_l <= avg_bits * sum_l params_l`` — the per-layer bit map that a search
space entry (or ``share_``'s overrides) consumes::

    >>> sens = hessian_sensitivity(model, calib)                    # {name: s}
    >>> bits = adaptive_bits(model, sens, avg_bits=3.0)             # {name: bits}
    >>> share_(model, WeightSharing(bits=8), overrides={re.escape(n): WeightSharing(bits=b) for n, b in bits.items()})
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..calib import iter_batches, move_to, supported, weight_matrix
from ..calib.data import model_device
from ..calib.hessian import resolve_layers
from ..calib.mixed import mixed_hessians
from ..config import CalibOptions
from ..errors import BudgetInfeasibleError, ConfigError

log = get_logger(__name__)


def allocate_bits(costs: dict[str, dict[int, float]], params: dict[str, int], avg_bits: float) -> dict[str, int]:
    """Bits per layer minimising ``sum costs[l][b_l]`` s.t. ``sum params_l b_l <= avg_bits * sum params_l``.

    Greedy on marginal gain per added weight-bit from the cheapest choice (exact for equal layer
    sizes and convex costs); the uniform allocation is returned instead when it is feasible and
    better, so the result is never worse than uniform bits.

    >>> allocate_bits({"a": {2: 9.0, 4: 1.0}, "b": {2: 1.0, 4: 0.5}}, {"a": 10, "b": 10}, 3.0)
    {'a': 4, 'b': 2}
    """
    if set(costs) != set(params) or not costs:
        raise ConfigError("allocate_bits: costs and params must name the same, non-empty set of layers")
    choices = {n: sorted(c) for n, c in costs.items()}
    budget = avg_bits * sum(params.values())
    plan = {n: ch[0] for n, ch in choices.items()}
    used = sum(params[n] * b for n, b in plan.items())
    if used > budget + 1e-9:
        raise BudgetInfeasibleError(f"allocate_bits: avg_bits={avg_bits} is below the smallest choice; the "
                                    f"cheapest plan averages {used / sum(params.values()):.3f} bits")

    def gain(n: str) -> tuple[float, int] | None:
        i = choices[n].index(plan[n])
        if i + 1 == len(choices[n]):
            return None
        nb = choices[n][i + 1]
        return (costs[n][plan[n]] - costs[n][nb]) / (params[n] * (nb - plan[n]) or 1), nb

    heap = [(-g[0], n, g[1]) for n in plan if (g := gain(n))]
    heapq.heapify(heap)
    while heap:
        _, n, nb = heapq.heappop(heap)
        extra = params[n] * (nb - plan[n])
        if used + extra > budget + 1e-9:
            continue  # this upgrade does not fit; smaller ones still may
        plan[n], used = nb, used + extra
        if g := gain(n):
            heapq.heappush(heap, (-g[0], n, g[1]))
    common = set.intersection(*(set(c) for c in choices.values()))
    uniform = [b for b in common if b <= avg_bits + 1e-9]
    if uniform:
        u = max(uniform)
        if sum(costs[n][u] for n in costs) < sum(costs[n][b] for n, b in plan.items()):
            return {n: u for n in costs}
    return plan


def predicted_costs(model: nn.Module, sensitivity: dict[str, float],
                    choices: Iterable[int] = range(2, 9)) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """``s * R^2 / (12 * 4^b)`` per layer and bit choice (R = range of the nonzero weights), and weights per layer."""
    modules = dict(model.named_modules())
    costs, params = {}, {}
    for name, s in sensitivity.items():
        w = modules[name].weight.detach()
        nz = w[w != 0]
        R = float(nz.max() - nz.min()) if nz.numel() else 0.0
        costs[name] = {b: float(s) * R * R / (12 * 4 ** b) for b in choices}
        params[name] = int((w != 0).sum())
    return costs, params


def adaptive_bits(model: nn.Module, sensitivity: dict[str, float], avg_bits: float,
                  choices: Iterable[int] = range(2, 9)) -> dict[str, int]:
    """Layer name -> bits for the layers of `sensitivity`, averaging at most `avg_bits` per nonzero weight.

    >>> adaptive_bits(model, hessian_sensitivity(model, calib), avg_bits=3.0)
    {'conv1': 6, 'conv2': 3, 'fc1': 2, 'fc2': 5}
    """
    costs, params = predicted_costs(model, sensitivity, list(choices))
    return allocate_bits(costs, params, avg_bits)


def _layers(model: nn.Module, names: list[str] | None) -> list[str]:
    return names if names is not None else [n for n, m in model.named_modules() if n and supported(m)]


def hessian_sensitivity(model: nn.Module, calib: Any, names: list[str] | None = None,
                        max_batches: int = 0, relative: bool = False, *,
                        options: CalibOptions | None = None) -> dict[str, float]:
    """``rows * tr(H)`` per layer from one dense calibration pass (H = 2 X X^T / n, brainsurgeon.calib).

    H is the compression driver's (``run_layerwise(mode="dense")``): padding tokens left out, and an
    encoder's calibration mixed with short prefixes and vocabulary singles as `options` say
    (:func:`~brainsurgeon.calib.mixed.mixed_forwards`, default ``CalibOptions()``; the mix's notes are logged
    at info).
    max_batches: if non-zero, replaces ``options.max_batches``.
    relative: divide by the layer's output energy ``tr(W H W^T)``, so the predicted cost is the
    *relative* output error — the quantity that survives a following BatchNorm/LayerNorm, which
    rescales each layer's output.

    >>> hessian_sensitivity(model, calib_loader)
    {'conv1': 41.2, ...}
    >>> hessian_sensitivity(bert, batches, options=CalibOptions(vocab_inputs=0))   # prefixes, no singles
    """
    names = _layers(model, names)
    hs, notes = mixed_hessians(model, resolve_layers(model, names), calib, options, max_batches)
    for note in notes:
        log.info("hessian_sensitivity: %s", note)
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        H = hs[n]
        rows = modules[n].weight.shape[0] // (H.shape[0] if H.dim() == 3 else 1)
        out[n] = float(rows * H.diagonal(dim1=-2, dim2=-1).sum())
        if relative:
            W = weight_matrix(modules[n]).to(H)  # (rows, cols); grouped: (g * rows, cols)
            Wg = W.reshape(H.shape[0], -1, W.shape[1]) if H.dim() == 3 else W[None]  # (g, rows, cols)
            Hg = H if H.dim() == 3 else H[None]
            out[n] /= max(float(torch.einsum("grc,gcd,grd->", Wg, Hg, Wg)), 1e-300)
    return out


def gradient_sensitivity(model: nn.Module, data: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                         names: list[str] | None = None, max_batches: int = 8) -> dict[str, float]:
    """Empirical Fisher ``sum_i g_i^2`` per layer weight, averaged over batches (eval mode; .grad restored).

    loss_fn(output, raw batch) defaults to cross-entropy on (input, label) batches.

    >>> gradient_sensitivity(model, train_loader, max_batches=4)
    """
    from .finetune import _cross_entropy

    loss_fn = loss_fn or _cross_entropy
    names = _layers(model, names)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names}
    old = {p: (p.grad, p.requires_grad) for p in model.parameters()}  # only the weights get gradients
    dev = model_device(model)
    acc = dict.fromkeys(names, 0.0)
    count = 0
    with eval_mode(model):
        try:
            for p in old:
                p.requires_grad_(False)
            for w in weights.values():
                w.requires_grad_(True)
            src = data() if callable(data) and not hasattr(data, "__iter__") else data
            for i, batch in enumerate(src):
                if i >= max_batches:
                    break
                (args, kwargs), = iter_batches([batch])
                for w in weights.values():
                    w.grad = None
                loss_fn(model(*move_to(args, dev), **move_to(kwargs, dev)), batch).backward()
                for n, w in weights.items():
                    acc[n] += float(w.grad.pow(2).sum()) if w.grad is not None else 0.0
                count += 1
        finally:
            for p, (grad, rg) in old.items():
                p.grad = grad
                p.requires_grad_(rg)
    if count == 0:
        raise ConfigError("gradient_sensitivity: the data is empty")
    return {n: v / count for n, v in acc.items()}
