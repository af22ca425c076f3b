"""Never worse than round-to-nearest on held-out inputs: GPTQ's rows checked against RTN's.

GPTQ (Frantar et al., ICLR 2023, eq. 2-3) lowers tr(dW H dW^T) on the calibration H by moving every row's
rounding error into directions H barely excites; inputs unlike the calibration ones (single words for a
sentence encoder) may excite them (bench/ood_diag.py). The guard compares, row by row, the squared output
error on inputs X that no Hessian saw (``calib.heldout``: vocabulary singles disjoint from the Hessians'),

    e_i(V) = sum_x ((V - W)_i x)^2 = (V - W)_i X^T X (V - W)_i^T,

of GPTQ's row (V = W_q) and of round-to-nearest's on the same grid (V = W_r), and keeps W_r's row where
e_i(W_q) > e_i(W_r). Rows are independent outputs, so on X the layer's error is then at most RTN's, row by
row; a row keeps GPTQ's solution wherever that held on inputs the solve did not fit.

    >>> W_out, worse = guard_rows(W, W_q, W_r, X)      # worse: rows that took W_r's values
"""

from __future__ import annotations

import torch

__all__ = ["guard_rows", "heldout_error"]


def heldout_error(W: torch.Tensor, V: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """e_i = sum over the rows x of X of ((V - W)_i x)^2, per row i of W (rows x cols); X (n, cols).

    >>> heldout_error(torch.zeros(1, 2), torch.ones(1, 2), torch.eye(2))
    tensor([2.])
    """
    D = (V - W).to(torch.float64)
    return (X.to(torch.float64) @ D.t()).square().sum(0)


def guard_rows(W: torch.Tensor, W_q: torch.Tensor, W_r: torch.Tensor,
               X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q with the rows whose held-out error exceeds W_r's replaced by W_r's, the mask of those rows).

    W, W_q, W_r: (rows, cols) - the original weight, GPTQ's and round-to-nearest's on the same grid;
    X: (n, cols) held-out inputs. Ties keep W_q.
    """
    worse = heldout_error(W, W_q, X) > heldout_error(W, W_r, X)  # (rows,)
    return torch.where(worse[:, None], W_r.to(W_q.dtype), W_q), worse
