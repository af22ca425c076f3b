"""Low-rank variants of a layer: rank choice, the solve, the factorized module and its measured costs.

A low-rank variant ``lr@p`` replaces a Linear or a Conv2d (groups=1) with weight matrix W (m x n)
by ``A (B x)`` of rank ``r = floor(p * m n / (m + n))``, i.e. at most a fraction p of the dense
weights. The factors are the activation-aware truncated SVD of :mod:`brainsurgeon.lowrank`
(SVD-LLM: SVD of W S with S S^T = H), so the database loss is the OBS layer loss
tr(dW H dW^T) of the rank-r reconstruction. ``apply_plan_`` applies it with the ``factorize``
verb (``LowRank(rank=r, activation_aware=True, conv="svd")``); the costs are those of the real
factorized module (:class:`~brainsurgeon.lowrank.LowRankLinear` / ``LowRankConv2d``), its MACs
counted by ``torch.utils.flop_counter`` like every other variant. A compact-design variant
``sep-KIND@p`` (a k x k conv -> :class:`~brainsurgeon.lowrank.Separable`) works the same way: the solve
gives the data-aware design's equivalent kernel (:func:`solve_separable`), the costs are those of the
real replacement (:func:`separable_module`), and ``apply_plan_`` applies it with ``transform_``.

    >>> rank_for(0.5, 64, 128)
    21
    >>> new = factorized_module(model.fc1, W_hat, 21)        # LowRankLinear(128 -> 21 -> 64)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..obs.hessian import layer_loss
from .costs import LayerProfile, _dense_macs
from .variants import rank_for

__all__ = ["factorizable", "factorized_module", "lowrank_costs", "rank_for", "separable_module", "solve_lowrank",
           "solve_separable"]


def factorizable(module: nn.Module) -> bool:
    """Whether the factorize verb can replace `module` (Linear, or Conv2d with groups=1)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def solve_lowrank(W: torch.Tensor, H: torch.Tensor, rank: int, damp: float) -> tuple[torch.Tensor, float, float]:
    """Rank-`rank` activation-aware reconstruction of W (any layout, rows first) with Hessian H (cols, cols).

    Returns (W_hat in W's shape, tr(dW H dW^T), that loss / tr(W H W^T)).
    """
    from ..lowrank import decompose, truncate

    Wm = W.reshape(W.shape[0], -1)  # (m, n), the weight_matrix column order
    A, B = truncate(decompose(Wm, H, damp), rank, torch.float64)  # (m, r), (r, n)
    W_hat = (A @ B).to(W.dtype).reshape(W.shape)
    loss = layer_loss(Wm, W_hat.reshape(Wm.shape), H)[0]
    ref = layer_loss(Wm, torch.zeros_like(Wm), H)[0]
    return W_hat, loss, (loss / ref if ref > 0 else 0.0)


def factorized_module(module: nn.Module, W_hat: torch.Tensor, rank: int) -> nn.Module:
    """The LowRankLinear / LowRankConv2d computing the rank-`rank` weight W_hat (plain SVD of W_hat: exact)."""
    from ..lowrank import LowRankConv2d, LowRankLinear, decompose, truncate

    Wm = W_hat.reshape(W_hat.shape[0], -1).to(module.weight)
    A, B = truncate(decompose(Wm), rank, Wm.dtype)
    A, B = A.to(Wm.device), B.to(Wm.device)
    if isinstance(module, nn.Linear):
        bias = module.bias.detach() if module.bias is not None else None
        new: nn.Module = LowRankLinear.from_factors(A, B, bias)
    else:
        new = LowRankConv2d.from_factors(module, A, B)
    return new.train(module.training)


def lowrank_costs(prof: LayerProfile, new: nn.Module, act_bits: int = 32) -> dict[str, float]:
    """Costs of the factorized module `new` (float32): its parameters, bytes, and counted MACs."""
    x = torch.zeros(prof.input_shape, dtype=next(new.parameters()).dtype, device=next(new.parameters()).device)
    macs = _dense_macs(new, x)
    params = float(sum(p.numel() for p in new.parameters()))
    return {"params": params, "bytes": 4.0 * params, "macs": macs, "flops": 2 * macs, "bops": macs * 32 * act_bits,
            "bops_obc": macs * 32.0}


def solve_separable(W: torch.Tensor, H: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, float, float]:
    """The compact design `cfg` (a ``Separable``) of the conv kernel W (T, S, kh, kw) fitted to the layer
    output on H (S*kh*kw, S*kh*kw) (weight-space when ``cfg.data_aware`` is False), as its equivalent kernel.

    Returns (W_hat in W's shape, tr(dW H dW^T), that loss / tr(W H W^T)).
    """
    from ..lowrank.separable import dense_kernel, design_rank, fit_separable, output_loss

    shape = tuple(W.shape)
    rank = design_rank(cfg.kind, shape, cfg.ratio)
    fit = fit_separable(W, H if cfg.data_aware else None, cfg.kind, rank, cfg.sweeps, cfg.cg_iters, cfg.damp,
                        cfg.tucker_sweeps)
    W_hat = dense_kernel(cfg.kind, fit.factors, shape).to(W.dtype)
    Wm, Wh = W.reshape(shape[0], -1), W_hat.reshape(shape[0], -1)
    loss, ref = output_loss(Wm, Wh, H), output_loss(Wm, torch.zeros_like(Wm), H)
    return W_hat, loss, (loss / ref if ref > 0 else 0.0)


def separable_module(module: nn.Conv2d, W_hat: torch.Tensor, cfg: Any) -> nn.Module:
    """The compact module (``transform_module``) computing the design kernel W_hat: the weight-space fit of
    a kernel that has the design's structure recovers it (SVD / HOOI of an exactly low-rank kernel)."""
    import copy

    from ..lowrank import Separable
    from ..lowrank.transform import transform_module

    conv = copy.deepcopy(module)
    with torch.no_grad():
        conv.weight.copy_(W_hat.reshape(conv.weight.shape).to(conv.weight))
    plain = Separable(kind=cfg.kind, ratio=cfg.ratio, data_aware=False, skip_larger=False,
                      tucker_sweeps=max(2, cfg.tucker_sweeps))
    new, _ = transform_module("", conv, plain)
    return new  # type: ignore[return-value]  # never None with skip_larger=False
