"""Truncated SVD, plain and activation-aware, as pure functions in the papers' notation.

A layer ``y = W x`` (W: m x n) is replaced by ``y = A (B x)`` with A: m x r, B: r x n.

* Plain SVD (Eckart-Young): ``W = U Sigma V^T``; the best rank-r ``A B`` in ``||W - A B||_F``.
* Activation-aware (Wang et al., "SVD-LLM", 2024, sec. 3.1; Yuan et al., "ASVD", 2023):
  with calibration inputs X (n x N) and ``X X^T = S S^T`` (Cholesky), ``||(W - A B) X||_F =
  ||(W - A B) S||_F``, so the SVD ``W S = U Sigma V^T`` truncated to rank r gives the optimal
  ``A = U_r Sigma_r^1/2``, ``B = Sigma_r^1/2 V_r^T S^-1`` for ``||W X - A B X||_F``.

Both are written as one :class:`Spectrum` ``W = U diag(s) R`` (R's rows are ``v_i^T`` or
``v_i^T S^-1``), so the layer loss of every rank comes from one decomposition:
``tr(dW H dW^T) = sum_{i > r} s_i^2 (r_i^T H r_i)`` (U has orthonormal columns)::

    >>> spec = decompose(W, H)                   # H = 2 X X^T / n from brainsurgeon.calib
    >>> A, B = truncate(spec, 16)
    >>> losses = spec.losses(H)                  # losses[r] = tr(dW H dW^T) at rank r
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._log import get_logger
from ..errors import ConfigError, NumericalError
from .config import LowRank

log = get_logger(__name__)


@dataclass
class Spectrum:
    """``W = U diag(s) R`` in float64: U (m, k) orthonormal columns, s (k,) descending, R (k, n)."""

    U: torch.Tensor
    s: torch.Tensor
    R: torch.Tensor
    damp_retries: int = 0

    @property
    def full_rank(self) -> int:
        return int(self.s.numel())

    def losses(self, H: torch.Tensor | None = None) -> torch.Tensor:
        """``losses[r]`` = ``tr(dW H dW^T)`` of the rank-r truncation, r = 0..k (``||dW||_F^2`` if H is None).

        >>> decompose(W).losses()[0]            # = ||W||_F^2
        """
        R = self.R
        g = (R * R).sum(1) if H is None else ((R @ H.to(R)) * R).sum(1)  # (k,): r_i^T H r_i
        tail = (self.s ** 2 * g).flip(0).cumsum(0).flip(0)  # tail[r] = sum_{i >= r}
        return torch.cat([tail, tail.new_zeros(1)])  # (k + 1,)


def whitening(H: torch.Tensor, damp: float, name: str = "") -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor S of ``H + lambda I`` (``S S^T``), lambda = damp * mean(diag H).

    Retries with 10x the dampening (up to 4 times, logged) when H is not positive definite.
    Returns (S, number of retries). H: (n, n).
    """
    H = H.to(torch.float64)
    mean = float(H.diagonal().mean())
    if not math.isfinite(mean):
        raise NumericalError(f"layer {name!r}: the calibration Hessian has non-finite entries; check the "
                             f"calibration data")
    base = mean if mean > 0 else 1.0
    lam = damp * base
    for retry in range(5):
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        S, info = torch.linalg.cholesky_ex(H + max(lam, 1e-12 * base) * eye)  # (n, n) lower
        if int(info) == 0:
            return S, retry
        lam = max(lam, 1e-8 * base) * 10
        log.warning("layer %r: X X^T not positive definite; retrying Cholesky with damp %.3g", name, lam / base)
    raise NumericalError(f"layer {name!r}: X X^T stayed singular after 4 dampening retries; raise "
                         f"LowRank(damp=...) or use more calibration data")


def decompose(W: torch.Tensor, H: torch.Tensor | None = None, damp: float = 0.01,
              name: str = "") -> Spectrum:
    """Full SVD of W (m, n), or of W S when a Hessian H (n, n) ~ X X^T is given (activation-aware).

    >>> spec = decompose(torch.randn(8, 5)); spec.full_rank
    5
    """
    W64 = W.detach().to(torch.float64)  # (m, n)
    if H is None:
        U, s, Vh = torch.linalg.svd(W64, full_matrices=False)  # (m, k), (k,), (k, n)
        return Spectrum(U, s, Vh)
    if H.shape != (W.shape[1], W.shape[1]):
        raise ConfigError(f"layer {name!r}: Hessian of shape {tuple(H.shape)} does not fit a weight of "
                          f"shape {tuple(W.shape)}; expected ({W.shape[1]}, {W.shape[1]})")
    S, retries = whitening(H.to(W64.device), damp, name)  # (n, n)
    U, s, Vh = torch.linalg.svd(W64 @ S, full_matrices=False)  # W S = U diag(s) V^T
    R = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)  # V^T S^-1: (k, n)
    return Spectrum(U, s, R, retries)


def truncate(spec: Spectrum, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m, r) = U_r diag(s_r)^1/2 and B (r, n) = diag(s_r)^1/2 R_r, in `dtype`.

    The square root is split evenly between the factors so both have similar ranges.

    >>> A, B = truncate(decompose(W), 4); (A @ B).shape == W.shape
    True
    """
    if not 1 <= rank <= spec.full_rank:
        raise ConfigError(f"rank must be in [1, {spec.full_rank}] (min(rows, cols)), got {rank}")
    root = spec.s[:rank].sqrt()  # (r,)
    A = spec.U[:, :rank] * root  # (m, r)
    B = root[:, None] * spec.R[:rank]  # (r, n)
    return A.to(dtype), B.to(dtype)


def linear_params(rows: int, cols: int, rank: int) -> int:
    """Weights of a rank-r factorization of a (rows, cols) matrix: ``r (rows + cols)``."""
    return rank * (rows + cols)


def choose_rank(s: torch.Tensor, rows: int, cols: int, cfg: LowRank) -> int:
    """The rank `cfg` asks for, from the (weighted) singular values s (k,), in [1, k].

    >>> choose_rank(torch.tensor([3.0, 2.0, 1.0]), 8, 3, LowRank(energy=0.9))
    2
    """
    k = int(s.numel())
    if cfg.rank:
        r = cfg.rank
    elif cfg.rank_ratio:
        r = math.ceil(cfg.rank_ratio * k)
    elif cfg.param_ratio:
        r = math.floor(cfg.param_ratio * rows * cols / (rows + cols))
    else:
        e = (s.to(torch.float64) ** 2).cumsum(0)
        e = e / e[-1].clamp_min(torch.finfo(e.dtype).tiny)
        r = int((e < cfg.energy - 1e-12).sum()) + 1
    return max(1, min(int(r), k))
