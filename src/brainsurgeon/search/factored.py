"""Low-rank variants of a layer: rank choice, the solve, the factorized module and its measured costs.

A low-rank variant ``lr@p`` replaces a Linear or a Conv2d (groups=1) with weight matrix W (m x n)
by ``A (B x)`` of rank ``r = floor(p * m n / (m + n))``, i.e. at most a fraction p of the dense
weights. The factors are the activation-aware truncated SVD of :mod:`brainsurgeon.lowrank`
(SVD-LLM: SVD of W S with S S^T = H), so the database loss is the OBS layer loss
tr(dW H dW^T) of the rank-r reconstruction. ``apply_plan_`` applies it with the ``factorize``
verb (``LowRank(rank=r, activation_aware=True, conv="svd")``); the costs are those of the real
factorized module (:class:`~brainsurgeon.lowrank.LowRankLinear` / ``LowRankConv2d``), its MACs
counted by ``torch.utils.flop_counter`` like every other variant.

    >>> rank_for(0.5, 64, 128)
    21
    >>> new = factorized_module(model.fc1, W_hat, 21)        # LowRankLinear(128 -> 21 -> 64)
"""

from __future__ import annotations

import torch
from torch import nn

from ..obs.hessian import layer_loss
from .costs import LayerProfile, _dense_macs
from .variants import rank_for

__all__ = ["factorizable", "factorized_module", "lowrank_costs", "rank_for", "solve_lowrank"]


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
