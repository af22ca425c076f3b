"""Hessian preparation shared by every OBS solver: dead inputs, dampening, inverse, Cholesky.

H = 2 X X^T / n is positive semi-definite; an input that is always zero (H_ii = 0) is "dead":
its weight column is zeroed (it never mattered) and H_ii set to 1 so H stays invertible.
Relative dampening adds lambda = damp * mean(diag H) to the diagonal; when the Cholesky still
fails, lambda grows 10x per retry and every retry is recorded (never silent).

    >>> prep = prepare(W, H, damp=0.01)
    >>> prep.Hinv @ prep.H  # ~ identity
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._log import get_logger
from ..errors import NumericalError

log = get_logger(__name__)

MAX_RETRIES = 6


@dataclass
class Prepared:
    """W with dead columns zeroed, the damped H, its inverse and the Cholesky of the inverse."""

    W: torch.Tensor  # rows x cols, working dtype
    H: torch.Tensor  # cols x cols, dead inputs fixed, damped
    L: torch.Tensor  # lower Cholesky factor of H
    dead: torch.Tensor  # cols, bool
    lam: float  # absolute dampening added to diag(H)
    retries: int

    @property
    def Hinv(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.L)

    def info(self) -> dict:
        """Facts for the report: dampening retries, dead inputs, absolute dampening."""
        return {"damp_retries": self.retries, "dead_inputs": int(self.dead.sum()), "damp": self.lam}


def damped_cholesky(H: torch.Tensor, damp: float, name: str = "") -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor of H + lambda*I, retrying with 10x lambda; returns (L, lambda, retries)."""
    mean = H.diagonal().mean().item()
    lam = damp * mean
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(MAX_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0 and torch.isfinite(L).all():
            return L, lam, retry
        new = max(lam * 10.0, 1e-8 * mean, torch.finfo(H.dtype).tiny)
        log.warning("layer %s: Hessian not positive definite with damping %.3g; retrying with %.3g",
                    name or "?", lam, new)
        lam = new
    raise NumericalError(f"layer {name or '?'}: Hessian stayed singular after {MAX_RETRIES} damping "
                         f"retries (last lambda={lam:.3g}); check the calibration data for "
                         f"degenerate inputs or raise damp (e.g. damp=0.1)")


def prepare(W: torch.Tensor, H: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64,
            name: str = "") -> Prepared:
    """Cast, zero dead columns, damp and factor. Never modifies the caller's tensors.

    With ``dtype=torch.float32`` the factorisation is tried in float32 first (the GPTQ reference's
    precision, half the time) and redone in float64 when float32 is not positive definite at `damp`,
    so float32 never raises the damping.
    """
    W = W.to(dtype=dtype, copy=True)
    H = H.to(device=W.device, dtype=dtype, copy=True)
    dead = H.diagonal() == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        log.info("layer %s: %d dead input(s) (H_ii = 0); their weight columns are zeroed",
                 name or "?", int(dead.sum()))
    if dtype != torch.float64:
        lam = damp * H.diagonal().mean().item()
        H.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
            return Prepared(W, H, L, dead, lam, 0)
        log.debug("layer %s: float32 Cholesky failed at damping %.3g; factoring in float64", name or "?", lam)
        H.diagonal().sub_(lam)
        W, H = W.double(), H.double()
    L, lam, retries = damped_cholesky(H, damp, name)
    H.diagonal().add_(lam)
    return Prepared(W, H, L, dead, lam, retries)


def inverse_factor(prep: Prepared, perm: torch.Tensor) -> torch.Tensor:
    """U upper with U^T U = (H^-1)[perm][:, perm]: the Cholesky of the inverse that GPTQ/SparseGPT walk.

    In prep's precision; redone in float64 when that is not positive definite (float32 round-off).
    """
    Hinv = prep.Hinv
    U, info = torch.linalg.cholesky_ex(Hinv[perm[:, None], perm], upper=True)
    if int(info) == 0 and bool(torch.isfinite(U.diagonal()).all()):
        return U
    L64 = torch.linalg.cholesky(prep.H.double())
    return torch.linalg.cholesky(torch.cholesky_inverse(L64)[perm[:, None], perm], upper=True).to(Hinv.dtype)


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(tr(dW H dW^T), tr(dW H dW^T) / tr(W H W^T)) with the caller's H, in its precision (>= float32)."""
    dt = torch.promote_types(H.dtype, torch.float32)
    H = H.to(device=W.device, dtype=dt)
    W2 = W.reshape(W.shape[0], -1).to(dt)
    D = W_hat.reshape(W2.shape).to(dt) - W2
    loss = torch.sum((D @ H) * D).item()
    ref = torch.sum((W2 @ H) * W2).item()
    return loss, loss / ref if ref > 0 else 0.0
