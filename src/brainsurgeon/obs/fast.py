"""SparseGPT and GPTQ: one left-to-right pass with blocked lazy OBS updates.

Frantar & Alistarh, "SparseGPT", ICML 2023 (Algorithm 1) and Frantar et al., "GPTQ", ICLR 2023
(Algorithm 1). Both walk the columns of W in order with U = chol(H^-1) (upper): column j is
fixed to its target q_j, the error (w_j - q_j) / U_jj is spread onto the later columns of the
block by U_j,j:, and onto the columns after the block with one GEMM. They differ only in the
target: 0 under a mask chosen on the fly (SparseGPT) or the nearest grid point (GPTQ).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..config import GPTQ, SparseGPT
from ..quant.grid import Grid, fit_grid, fit_rows
from .baselines import grid_levels
from .engine import register_solver
from .hessian import Prepared, decouple_, inverse_factor, prepare, shrink_
from .refine import refine_on_grid
from .resolve import resolve_masked

# target(i1, j, W1, out) -> the value column i1 + j is fixed to (rows,), written into `out` (or
# returned); W1 is the current block transposed (block columns x rows), so column i1 + j of W is
# the contiguous row W1[j]
Target = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]

WALK_DTYPE = torch.float32  # precision of the factorisation and the walk (the reference code's); see prepare


_FACTOR: dict[str, tuple] = {}  # one entry: the last (H, damp, order) -> (damped H, U, lam, retries)


def _factor(prep: Prepared, perm: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """:func:`inverse_factor`, reused while the same H object comes back (q/k/v share one H)."""
    hit = _FACTOR.get("f")
    key = (prep.damp, prep.shrink, prep.decoupled, prep.H.dtype, H._version)
    if hit is not None and hit[0]() is H and hit[1] == key and torch.equal(hit[2], perm):
        prep.H, prep.lam, prep.retries = hit[3], hit[5], hit[6]
        return hit[4]
    U = inverse_factor(prep, perm)
    _FACTOR["f"] = (weakref.ref(H, lambda _: _FACTOR.clear()), key, perm,
                    prep.H, U, prep.lam, prep.retries)
    return U


def blocked_walk(W: torch.Tensor, U: torch.Tensor, blocksize: int, target: Target) -> torch.Tensor:
    """Fix the columns of W (rows x cols) left to right to `target`, compensating with U.

    Works on W^T (cols x rows, contiguous) so every column is one contiguous row, and on U with
    each row divided by its diagonal: fixing column j to q_j subtracts (w_j - q_j) U_j,j: / U_jj
    from the later columns, one rank-1 update inside the block and one GEMM after it.
    """
    Wt = W.t().contiguous()  # (rows, cols) -> (cols, rows)
    Un = U / torch.diagonal(U)[:, None]  # unit diagonal: row j of U over U_jj
    cols = Wt.shape[0]
    E = torch.empty_like(Wt[:blocksize])  # (block, rows): w_j - q_j of the block's columns
    Q = torch.empty_like(E)  # (block, rows): q_j
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, E1, Q1 = Wt[i1:i2], Un[i1:i2, i1:i2], E[:i2 - i1], Q[:i2 - i1]
        w_rows, u_rows, e_rows, q_rows = W1.unbind(0), U1.unbind(0), E1.unbind(0), Q1.unbind(0)
        for j in range(i2 - i1):
            q = target(i1, j, W1, q_rows[j])
            torch.sub(w_rows[j], q, out=e_rows[j])
            W1[j + 1:].addr_(u_rows[j][j + 1:], e_rows[j], alpha=-1.0)  # (B-j-1, rows) -= u (x) e
            if q is not q_rows[j]:
                q_rows[j].copy_(q)
        W1.copy_(Q1)
        if i2 < cols:
            Wt[i2:].addmm_(Un[i1:i2, i2:].t(), E1, alpha=-1.0)  # (cols-i2, B) @ (B, rows)
    return Wt.t()


def sparsegpt(prep: Prepared, cfg: SparseGPT, perm: torch.Tensor,
              H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT in column order `perm` (N:M groups consecutive); returns (W_hat, keep mask).

    H: the caller's Hessian, the key under which the factorisation is reused (None: no reuse)."""
    W = prep.W[:, perm].to(WALK_DTYPE)
    U = _factor(prep, perm, H) if H is not None else inverse_factor(prep, perm)
    d2 = (torch.diagonal(U) ** 2).to(WALK_DTYPE)[:, None]  # [H^-1]_jj in the walk's current order
    pat = cfg.parsed
    keep = torch.ones(W.shape[1], W.shape[0], dtype=torch.bool, device=W.device)  # transposed, like W1

    def target(i1: int, j: int, W1: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B = W1.shape[0]
        if pat.kind == "nm":
            if j % pat.m == 0:  # choose M - N of the next M columns of every row
                s = W1[j:j + pat.m] ** 2 / d2[i1 + j:i1 + j + pat.m]  # OBS saliency w^2 / [H^-1]_jj
                drop = torch.topk(s, pat.m - pat.n, dim=0, largest=False).indices + j
                keep[i1:i1 + B].scatter_(0, drop, False)
        elif j == 0:  # adaptive mask for the whole block, ranked over all its weights
            k = round(cfg.target_sparsity * W1.numel())
            if k:
                score = W1**2 / d2[i1:i1 + B]
                keep[i1:i1 + B].view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
        return torch.mul(W1[j], keep[i1 + j], out=out)

    B = cfg.blocksize if pat.kind != "nm" else max(pat.m, cfg.blocksize // pat.m * pat.m)
    Wp = blocked_walk(W, U.to(WALK_DTYPE), B, target).to(prep.W.dtype)
    out, mask = torch.empty_like(Wp), torch.empty_like(keep.t())
    out[:, perm], mask[:, perm] = Wp, keep.t()
    return out, mask


def gptq(prep: Prepared, cfg: GPTQ, H_key: torch.Tensor | None = None,
         grid: Grid | None = None, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """GPTQ with optional act-order (columns by descending H_ii) and group size.

    Groups are contiguous in the original column order. Without act-order a group's grid is
    fitted when the walk reaches it (on the updated weights); with act-order the groups are
    static, fitted up front, so every group keeps one grid whatever the order. H_key: the caller's
    Hessian, under which the factorisation is reused by the next layer with the same H. grid: the
    up-front grid ``fit_grid(prep.W, ...)`` when the caller already has it (it depends on W only).
    perm: a column order of the caller's (groups then static, as with act-order) instead of cfg's.
    """
    W, H = prep.W, prep.H
    cols = W.shape[1]
    static = cfg.act_order or perm is not None
    if perm is None:
        perm = (torch.argsort(torch.diagonal(H), descending=True) if cfg.act_order
                else torch.arange(cols, device=W.device))
    U = _factor(prep, perm, H_key) if H_key is not None else inverse_factor(prep, perm)
    maxq = 2**cfg.bits - 1
    g = cfg.group_size if 0 < cfg.group_size < cols else 0
    grid = grid or fit_grid(W, cfg.bits, cfg.sym, g, cfg.mse)
    # one row per group (groups x rows): q = s * clamp(round(w / s), -z, maxq - z) is quantize() exactly
    S, Z = grid.scale.t().to(WALK_DTYPE, copy=True).contiguous(), grid.zero.t().to(WALK_DTYPE, copy=True).contiguous()
    LO, HI = -Z, maxq - Z
    s_rows, lo_rows, hi_rows = S.unbind(0), LO.unbind(0), HI.unbind(0)
    group = (perm // g).tolist() if g else [0] * cols  # group of the column the walk fixes c-th
    lazy_groups = g and not static
    frozen = (W == 0)[:, perm].t()  # zeros of an already pruned layer stay zero
    frozen_rows = frozen.contiguous().unbind(0) if bool(frozen.any()) else None

    def target(i1: int, j: int, W1: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c = i1 + j
        k = group[c]
        if lazy_groups and c % g == 0:  # fit this group's grid on the current (updated) weights
            s, z = fit_rows(W1[j:j + g].t(), cfg.bits, cfg.sym, cfg.mse)
            S[k], Z[k], LO[k], HI[k] = s, z, -z, maxq - z
        q = torch.div(W1[j], s_rows[k], out=out).round_().clamp_(lo_rows[k], hi_rows[k]).mul_(s_rows[k])
        return q.masked_fill_(frozen_rows[c], 0.0) if frozen_rows is not None else q

    B = max(g, cfg.blocksize // g * g) if lazy_groups else cfg.blocksize
    Wq = blocked_walk(W[:, perm].to(WALK_DTYPE), U.to(WALK_DTYPE), B, target).to(W.dtype).add_(0.0)  # -0 -> +0
    if cfg.refine:
        idx = torch.tensor(group, device=W.device)
        scale, zero = S.t()[:, idx].to(W.dtype), Z.t()[:, idx].to(W.dtype)  # rows x cols, walk order
        Wq = refine_on_grid(W[:, perm], Wq, prep.H[perm][:, perm], scale, zero, maxq, cfg.refine, frozen.t())
    out = torch.empty_like(Wq)
    out[:, perm] = Wq
    idx = torch.arange(cols, device=W.device) // g if g else torch.zeros(cols, dtype=torch.long, device=W.device)
    codes = torch.round(out / S.t()[:, idx]) + Z.t()[:, idx]  # rows x cols, original order
    return out, {"perm": perm, "levels": grid_levels(codes, maxq, g)}


@register_solver(SparseGPT)
def _solve_sparsegpt(W: torch.Tensor, H: torch.Tensor, cfg: SparseGPT, perm: torch.Tensor, name: str):
    prep = prepare(W, H, cfg.damp, WALK_DTYPE, name=name, factor=False)
    Wp, keep = sparsegpt(prep, cfg, perm, H)
    if cfg.resolve:  # fast mask, exact weights: masked least squares per row (float64)
        Wp = resolve_masked(prep.W.double(), prep.H.double(), keep)
    return Wp, prep.info()


@register_solver(GPTQ)
def _solve_gptq(W: torch.Tensor, H: torch.Tensor, cfg: GPTQ, perm: torch.Tensor, name: str):
    prep = prepare(W, H, cfg.damp, WALK_DTYPE, name=name, factor=False)
    if not isinstance(cfg.shrink, str) and cfg.shrink:  # "auto"/"heldout": applied to H by the calibration driver
        shrink_(prep.H, cfg.shrink)
        prep.shrink = cfg.shrink
    if not isinstance(cfg.decouple, str) and cfg.decouple:  # "auto": resolved by the calibration driver's caller
        prep.decoupled = int(decouple_(prep.H, cfg.decouple).sum())
    W_hat, extra = gptq(prep, cfg, H)
    return W_hat, {**prep.info(), "levels": extra["levels"]}
