"""Held-out choice of GPTQ's Hessian shrinkage when the calibration H is singular.

With fewer calibration rows than input columns, H = 2 X X^T / n has a null space: GPTQ, which
minimises tr(dW H dW^T), may move its rounding error into directions no calibration token
excites, at no cost on the calibration data and at full cost on inputs that do excite them.
Shrinking H toward its diagonal, H(l) = (1 - l) H + l diag(H), bounds that (l = 1 is round-to-
nearest). The intensity is chosen by cross-validation over the calibration samples, as Friedman's
regularized discriminant analysis chooses its covariance shrinkage ("Regularized Discriminant
Analysis", JASA 1989; Stone, "Cross-validatory choice and assessment of statistical predictions",
JRSS B 1974): with the samples split into two folds A and B,

    CV(l) = tr(dW_A(l) H_B dW_A(l)^T) + tr(dW_B(l) H_A dW_B(l)^T),  dW_F(l) = GPTQ(W, H_F(l)) - W,

each term an unbiased estimate of the expected loss of a solve that did not see the scored fold.
The grid holds 0 (plain GPTQ), 1 (round-to-nearest) and Schaefer & Strimmer's analytic intensity
(Strimmer 2005; calib.shrinkage.shrinkage_intensity). Each fold holds half of the samples, so the
pick leans to more shrinkage than the full data needs: the safe side.

    >>> lam, cv = select_shrinkage(W, fold_hessians(H, n, X_B), gptq_solver(GPTQ(bits=4)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import GPTQ
from ..quant.grid import fit_grid
from .fast import WALK_DTYPE, gptq
from .hessian import layer_loss, prepare, shrink_

SHRINK_GRID = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # plus the layer's Schaefer-Strimmer intensity
MAX_ROWS = 512  # rows scored (evenly spaced): the loss is a sum over independent rows

# solve(W rows x cols, H cols x cols) -> W_hat: the layer's solver with no shrinkage of its own
Fit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def select_shrinkage(W: torch.Tensor, folds: Sequence[tuple[torch.Tensor, torch.Tensor]], solve: Fit,
                     grid: Sequence[float] = SHRINK_GRID, max_rows: int = MAX_ROWS) -> tuple[float, list[float]]:
    """The l of `grid` minimising the held-out loss sum_F tr(dW_F(l) H_out dW_F(l)^T); ties: the smaller l.

    ``folds``: (H_fit, H_out) pairs; returns (l, the held-out loss of each grid value, in grid order
    after sorting). ``W`` (rows x cols) is scored on at most `max_rows` evenly spaced rows.

    >>> lam, cv = select_shrinkage(W, [(HA, HB), (HB, HA)], solve, grid=(0.0, 0.5, 1.0))
    """
    lams = sorted(set(float(x) for x in grid))
    if W.shape[0] > max_rows:
        W = W[torch.linspace(0, W.shape[0] - 1, max_rows).round().long()]  # (max_rows, cols)
    cv = []
    for lam in lams:
        total = 0.0
        for H_fit, H_out in folds:
            W_hat = solve(W, shrink_(H_fit.clone(), lam))
            total += layer_loss(W, W_hat, H_out)[0]
        cv.append(total)
    best = min(range(len(lams)), key=lambda i: (cv[i], lams[i]))
    return lams[best], cv


def gptq_solver(cfg: GPTQ, name: str = "") -> Fit:
    """GPTQ with `cfg` and no shrinkage of its own, as ``compress_weight(W, H, cfg)`` solves it, for one W:
    the up-front grid (which depends on W, not H: the MSE grid search is most of a solve) is fitted
    once per set of dead inputs and reused over the grid of intensities and the folds.

    >>> solve = gptq_solver(GPTQ(bits=4, group_size=128)); W_hat = solve(W, H)
    """
    grids: dict[bytes, object] = {}

    def solve(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        prep = prepare(W.double(), H.double(), cfg.damp, WALK_DTYPE, name=name, factor=False)
        g = cfg.group_size if 0 < cfg.group_size < W.shape[1] else 0
        key = prep.dead.cpu().numpy().tobytes()
        if key not in grids:
            grids[key] = fit_grid(prep.W, cfg.bits, cfg.sym, g, cfg.mse)
        return gptq(prep, cfg, grid=grids[key])[0]
    return solve
