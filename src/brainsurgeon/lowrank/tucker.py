"""Tucker-2 decomposition of a conv kernel: 1x1 -> k x k -> 1x1 (Kim et al., ICLR 2016).

A kernel K (T out, S in, kh, kw) is approximated along its two channel modes:
``K ~ G x_0 U x_1 V`` with U (T, R_out), V (S, R_in) orthonormal and the core
G (R_out, R_in, kh, kw). HOSVD initialises U and V with the leading left singular vectors of the
mode-0 / mode-1 unfoldings (De Lathauwer et al., SIAM J. Matrix Anal. Appl., 2000); HOOI sweeps
(ALS) then alternate ``U <- lead(unfold_0(K x_1 V^T))``, ``V <- lead(unfold_1(K x_0 U^T))``,
which never increases ``||K - G x_0 U x_1 V||_F``. As a conv sequence:
``x -> conv1x1(V^T) -> conv_kxk(G) -> conv1x1(U) (+ bias)``::

    >>> U, G, V = tucker2(K, r_out=16, r_in=8, sweeps=2)
    >>> K_hat = reconstruct(U, G, V)            # (T, S, kh, kw)
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .config import LowRank


def _leading(M: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading left singular vectors of M (rows, cols): (rows, r)."""
    U, _, _ = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r]


def reconstruct(U: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``G x_0 U x_1 V``: U (T, Ro), G (Ro, Ri, kh, kw), V (S, Ri) -> (T, S, kh, kw)."""
    return torch.einsum("oihw,to,si->tshw", G, U, V)


def tucker2(K: torch.Tensor, r_out: int, r_in: int, sweeps: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """HOSVD (+ `sweeps` HOOI sweeps) Tucker-2 of K (T, S, kh, kw) -> (U (T, r_out), G, V (S, r_in)), float64.

    >>> U, G, V = tucker2(torch.randn(8, 4, 3, 3), r_out=8, r_in=4)   # full ranks: exact
    """
    T, S = K.shape[:2]
    k = K[0, 0].numel()
    if not (1 <= r_out <= min(T, r_in * k) and 1 <= r_in <= min(S, r_out * k)):
        raise ConfigError(f"Tucker-2 ranks must satisfy 1 <= r_out <= min(T={T}, r_in*k={r_in * k}) and "
                          f"1 <= r_in <= min(S={S}, r_out*k={r_out * k}), got r_out={r_out}, r_in={r_in}; "
                          f"choose_tucker_ranks gives a feasible pair")
    K = K.detach().to(torch.float64)
    U = _leading(K.reshape(T, -1), r_out)  # mode-0 unfolding (T, S*kh*kw)
    V = _leading(K.transpose(0, 1).reshape(S, -1), r_in)  # mode-1 unfolding (S, T*kh*kw)
    for _ in range(sweeps):
        Y = torch.einsum("tshw,si->tihw", K, V)  # K x_1 V^T: (T, r_in, kh, kw)
        U = _leading(Y.reshape(T, -1), r_out)
        Z = torch.einsum("tshw,to->sohw", K, U)  # K x_0 U^T, mode 1 first: (S, r_out, kh, kw)
        V = _leading(Z.reshape(S, -1), r_in)
    G = torch.einsum("tshw,to,si->oihw", K, U, V)  # core: (r_out, r_in, kh, kw)
    return U, G, V


def tucker2_params(T: int, S: int, k: int, r_out: int, r_in: int) -> int:
    """Weights of the 1x1 -> k x k -> 1x1 sequence: ``S R_in + R_out R_in k + T R_out`` (k = kh*kw)."""
    return S * r_in + r_out * r_in * k + T * r_out


def _mode_energy_rank(M: torch.Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(M.to(torch.float64)) ** 2
    e = s2.cumsum(0) / s2.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return int((e < energy - 1e-12).sum()) + 1


def choose_tucker_ranks(K: torch.Tensor, cfg: LowRank) -> tuple[int, int]:
    """(r_out, r_in) that `cfg` asks for, for a kernel K (T, S, kh, kw).

    A parameter budget scales both ranks with the channel counts: ``r = alpha * (T, S)`` with the
    largest alpha whose :func:`tucker2_params` stay within ``param_ratio * T S k``. Each rank is then
    capped at the other rank times k (a core (R_out, R_in, k) has mode ranks at most R_in k and R_out k),
    so the ranks reported are the ranks the factors have (a 3-channel stem: (10, 1) -> (9, 1)).

    >>> choose_tucker_ranks(torch.randn(64, 32, 3, 3), LowRank(param_ratio=0.25))
    (24, 12)
    """
    T, S = K.shape[:2]
    k = K[0, 0].numel()
    if cfg.rank:
        r_out, r_in = cfg.rank, cfg.rank
    elif cfg.rank_ratio:
        r_out, r_in = math.ceil(cfg.rank_ratio * T), math.ceil(cfg.rank_ratio * S)
    elif cfg.param_ratio:
        a, b, c = S * T * k, S * S + T * T, cfg.param_ratio * S * T * k  # a alpha^2 + b alpha = c
        alpha = (-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
        r_out, r_in = math.floor(alpha * T), math.floor(alpha * S)
    else:
        r_out = _mode_energy_rank(K.reshape(T, -1), cfg.energy)
        r_in = _mode_energy_rank(K.transpose(0, 1).reshape(S, -1), cfg.energy)
    r_out, r_in = max(1, min(r_out, T)), max(1, min(r_in, S))
    # The core's mode-0 unfolding is (R_out, R_in k): ranks above R_in k (or R_out k) add weights, not rank.
    return min(r_out, r_in * k), min(r_in, r_out * k)
