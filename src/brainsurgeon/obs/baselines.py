"""Data-free baselines: magnitude pruning and round-to-nearest quantization."""

from __future__ import annotations

import torch

from ..config import RTN, Magnitude
from ..quant.grid import fit_grid
from .engine import register_solver


def magnitude_mask(W: torch.Tensor, cfg: Magnitude, perm: torch.Tensor) -> torch.Tensor:
    """Keep-mask of magnitude pruning (rows x cols) in the original column order.

    Unstructured: the smallest |w| of the layer. N:M: the M - N smallest of each group of M
    (consecutive in `perm` order). block{c}: the blocks of smallest L2 norm.
    """
    pat = cfg.parsed
    A = W[:, perm].abs()
    rows, cols = A.shape
    keep = torch.ones_like(A, dtype=torch.bool)
    if pat.kind == "nm":
        g = A.reshape(rows, cols // pat.m, pat.m)
        drop = torch.topk(g, pat.m - pat.n, dim=2, largest=False).indices
        keep.view(rows, -1, pat.m).scatter_(2, drop, False)
    else:
        c = pat.block
        score = A.reshape(rows, cols // c, c).pow(2).sum(-1)  # rows x blocks
        k = round(cfg.target_sparsity * score.numel())
        if k:
            bk = torch.ones_like(score, dtype=torch.bool)
            bk.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
            keep = bk.repeat_interleave(c, dim=1)
    out = torch.empty_like(keep)
    out[:, perm] = keep
    return out


def magnitude(W: torch.Tensor, cfg: Magnitude, perm: torch.Tensor) -> torch.Tensor:
    """Magnitude-pruned copy of W (rows x cols)."""
    return W * magnitude_mask(W, cfg, perm)


def rtn(W: torch.Tensor, cfg: RTN) -> torch.Tensor:  # the same values as the RTN solver
    """Round-to-nearest on a per-row (or per-group) grid."""
    return fit_grid(W, cfg.bits, cfg.sym, cfg.group_size, cfg.mse).quantize(W)


def grid_levels(codes: torch.Tensor, maxq: int, group_size: int) -> int:
    """Most distinct integer codes (0..maxq) in one row, or one row-group of `group_size` columns.

    Linear time (api's generic count sorts every group): each code becomes the bit ``1 << code``,
    a group's bits are OR-ed by halving, and the most set bits is the count. Grids of more than
    63 levels count with one bincount over (group, code) pairs instead.
    """
    rows, cols = codes.shape
    g = group_size if 0 < group_size < cols else cols
    pad = (-cols) % g
    c = torch.nn.functional.pad(codes, (0, pad), value=float(codes[0, 0])) if pad else codes
    c = c.reshape(-1, g)  # (rows * groups, g)
    if maxq >= 63:
        n = c.shape[0]
        pairs = (c.long() + torch.arange(n, device=c.device)[:, None] * (maxq + 1)).flatten()
        return int((torch.bincount(pairs, minlength=n * (maxq + 1)).view(n, -1) > 0).sum(1).max())
    dtype = torch.int16 if maxq < 16 else torch.int32 if maxq < 32 else torch.int64  # narrow: less memory traffic
    bits = torch.ones((), dtype=dtype, device=c.device) << c.to(dtype)
    while bits.shape[1] > 1:  # OR the two halves (an odd last column is carried over)
        h = bits.shape[1] // 2
        bits = torch.cat([bits[:, :h] | bits[:, h:2 * h], bits[:, 2 * h:]], 1) if bits.shape[1] % 2 \
            else bits[:, :h] | bits[:, h:]
    mask, count = bits[:, 0], torch.zeros(c.shape[0], dtype=dtype, device=c.device)
    for b in range(maxq + 1):
        count += (mask >> b) & 1
    return int(count.max())


def _rtn_grouped(W: torch.Tensor, cfg: RTN) -> tuple[torch.Tensor, int]:
    """RTN on a (rows, groups, g) view with one scale per group (no rows x cols scale tensors)."""
    grid = fit_grid(W, cfg.bits, cfg.sym, cfg.group_size, cfg.mse)
    rows, cols = W.shape
    g = grid.group_size or cols
    pad = (-cols) % g
    Wg = (torch.nn.functional.pad(W, (0, pad)) if pad else W).reshape(rows, -1, g)  # (rows, groups, g)
    s, z = grid.scale[:, :, None].to(W.dtype), grid.zero[:, :, None].to(W.dtype)
    codes = torch.div(Wg, s).round_().add_(z).clamp_(0, grid.maxq)  # quantize() step by step, in place
    levels = grid_levels(codes.reshape(rows, -1)[:, :cols], grid.maxq, grid.group_size)
    return codes.sub_(z).mul_(s).reshape(rows, -1)[:, :cols], levels


@register_solver(Magnitude, data_free=True)
def _solve_magnitude(W: torch.Tensor, H: torch.Tensor | None, cfg: Magnitude, perm: torch.Tensor, name: str):
    return magnitude(W, cfg, perm), {}


@register_solver(RTN, data_free=True)
def _solve_rtn(W: torch.Tensor, H: torch.Tensor | None, cfg: RTN, perm: torch.Tensor, name: str):
    W_hat, levels = _rtn_grouped(W, cfg)
    return W_hat, {"levels": levels}
