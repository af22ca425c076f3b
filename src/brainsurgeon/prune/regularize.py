"""Group-sparsity regularisers for any training loop: push whole coupled channels towards zero.

    >>> reg = GroupNormRegularizer(graph.groups(), model, reg=1e-3)
    >>> for x, y in loader:
    ...     loss = F.cross_entropy(model(x), y) + reg.penalty(model)
    ...     loss.backward(); opt.step(); opt.zero_grad()
    ...     reg.step()                     # grows the penalty on the weakest channels
    >>> slim = BNL1(model, reg=1e-4)       # Network Slimming's L1 on BatchNorm scales

After training, prune with ``importance="group_l2"`` (or ``"bn_scale"``): the channels the
regulariser drove to zero are the ones removed, at little cost in accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .importance import is_param


def _channel_sq_norms(model: nn.Module, group: Any) -> torch.Tensor:
    """sum over the group's parameter slices of ||w_{s,c}||^2, differentiable, (n,)."""
    total = None
    for s in group.slices:
        if not is_param(model, s):
            continue
        t = getattr(model.get_submodule(s.module), s.tensor)  # live parameter
        x = t.movedim(s.dim, 0)[s.idxs.to(t.device).reshape(-1)]  # (n * k, *rest)
        sq = x.reshape(s.idxs.shape[0], -1).float().pow(2).sum(1)  # (n,)
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        raise ConfigError(f"group rooted at {group.root.module!r} has no parameter slice to regularise")
    return total


class GroupNormRegularizer:
    """DepGraph's group-level sparsity (Fang et al., "DepGraph: Towards Any Structural Pruning",
    CVPR 2023, Sec. 3.3) with a growing penalty (Wang et al., "Neural Pruning via Growing
    Regularization", ICLR 2021).

    penalty = sum_g sum_c lam_{g,c} ||w_{g,c}||_2 over every coupled parameter slice of channel c
    of group g. Initially lam_{g,c} = reg * 2^(alpha (I_max - I_c) / (I_max - I_min)) (weaker
    channels get a larger weight); each :meth:`step` adds `delta` to lam of the ``ratio`` weakest
    channels of each group (capped at `max_reg`), so they are driven to zero while the rest train.

    >>> reg = GroupNormRegularizer(groups, model, reg=1e-3, alpha=4, delta=1e-4, ratio=0.5)
    """

    def __init__(self, groups: Sequence[Any], model: nn.Module, reg: float = 1e-4, alpha: float = 4.0,
                 delta: float = 1e-5, ratio: float = 0.5, max_reg: float = 1.0) -> None:
        if not groups:
            raise ConfigError("GroupNormRegularizer: no groups given; pass DependencyGraph(...).groups()")
        if not (reg >= 0 and delta >= 0 and alpha >= 0 and 0 <= ratio < 1 and max_reg >= reg):
            raise ConfigError(f"GroupNormRegularizer: need reg, delta, alpha >= 0, 0 <= ratio < 1 and "
                              f"max_reg >= reg; got reg={reg}, delta={delta}, alpha={alpha}, "
                              f"ratio={ratio}, max_reg={max_reg}")
        self.groups, self.model = list(groups), model
        self.delta, self.ratio, self.max_reg = delta, ratio, max_reg
        self.lam: list[torch.Tensor] = []
        with torch.no_grad():
            for g in self.groups:
                imp = _channel_sq_norms(model, g).sqrt()  # (n,)
                span = (imp.max() - imp.min()).clamp_min(1e-12)
                self.lam.append(reg * torch.pow(2.0, alpha * (imp.max() - imp) / span))

    def norms(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """Current group norms ||w_{g,c}||_2, one (n,) tensor per group (no grad)."""
        with torch.no_grad():
            return [_channel_sq_norms(model or self.model, g).sqrt() for g in self.groups]

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """The differentiable penalty to add to the training loss."""
        model = model or self.model
        terms = [(lam.to(n.device) * (n + 1e-12).sqrt()).sum()
                 for g, lam in zip(self.groups, self.lam, strict=True) for n in [_channel_sq_norms(model, g)]]
        return torch.stack([t.to(terms[0].device) for t in terms]).sum()

    def step(self) -> None:
        """Grow the penalty of each group's ``ratio`` weakest channels by `delta` (up to `max_reg`)."""
        for i, n in enumerate(self.norms()):
            k = int(self.ratio * n.shape[0])
            if k:
                weak = torch.argsort(n.cpu())[:k]
                self.lam[i][weak] = (self.lam[i][weak] + self.delta).clamp_max(self.max_reg)


class BNL1:
    """Network Slimming's sparsity on BatchNorm scales (Liu et al., ICCV 2017, eq. 1): reg * sum |gamma|.

    >>> slim = BNL1(model, reg=1e-4)
    >>> loss = task_loss + slim.penalty(model)
    """

    def __init__(self, model: nn.Module, reg: float = 1e-4, modules: Sequence[str] | None = None) -> None:
        if reg < 0:
            raise ConfigError(f"BNL1: reg must be >= 0, got {reg}")
        bns = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
        if modules is not None:
            missing = sorted(set(modules) - set(bns))
            if missing:
                raise ConfigError(f"BNL1: {missing} are not affine BatchNorm modules of the model; "
                                  f"choose from {sorted(bns)[:8]}...")
            bns = {n: bns[n] for n in modules}
        if not bns:
            raise ConfigError("BNL1: the model has no affine BatchNorm layer; use GroupNormRegularizer")
        self.model, self.reg, self.names = model, reg, list(bns)

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """reg * sum of |gamma| over the chosen BatchNorm layers (differentiable)."""
        model = model or self.model
        ws = [model.get_submodule(n).weight.abs().sum() for n in self.names]
        return self.reg * torch.stack([w.to(ws[0].device) for w in ws]).sum()

    def step(self) -> None:
        """No schedule (kept for the same training-loop interface as GroupNormRegularizer)."""
