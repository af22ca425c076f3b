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
    H: torch.Tensor  # cols x cols, dead inputs fixed, damped (once factored)
    L: torch.Tensor | None  # lower Cholesky factor of H; None until inverse_factor damps and factors
    dead: torch.Tensor  # cols, bool
    lam: float  # absolute dampening added to diag(H)
    retries: int
    damp: float = 0.0  # the relative dampening asked for
    name: str = ""
    shrink: float = 0.0  # shrinkage toward diag(H) applied to H (see shrink_)
    decoupled: int = 0  # columns decoupled from the rest of H (see decouple_)

    @property
    def Hinv(self) -> torch.Tensor:
        if self.L is None:
            raise ValueError("prepare(..., factor=False) has no Cholesky factor; use inverse_factor")
        return torch.cholesky_inverse(self.L)

    def info(self) -> dict:
        """Facts for the report: dampening retries, dead inputs, absolute dampening."""
        return {"damp_retries": self.retries, "dead_inputs": int(self.dead.sum()), "damp": self.lam,
                "decoupled": self.decoupled}


def shrink_(H: torch.Tensor, lam: float) -> torch.Tensor:
    """H <- (1 - lam) H + lam diag(H) in place: the off-diagonal entries scaled by 1 - lam.

    Shrinkage of a sample covariance toward its diagonal (Ledoit & Wolf, "A well-conditioned
    estimator for large-dimensional covariance matrices", 2004; target "D" of Schaefer & Strimmer,
    "A shrinkage approach to large-scale covariance matrix estimation", 2005). lam = 0 is H,
    lam = 1 its diagonal, under which GPTQ's walk spreads no error and is round-to-nearest.
    """
    d = H.diagonal().clone()
    H.mul_(1.0 - lam)
    H.diagonal().copy_(d)
    return H


def decouple_(H: torch.Tensor, k: float) -> torch.Tensor:
    """Zero, in place, the off-diagonal entries of H's rows and columns j with H_jj > k median(diag H);
    returns their mask.

    Such columns carry massive activations (a few channels, large on a few tokens: Sun et al., "Massive
    Activations in Large Language Models", 2024). GPTQ would spread their rounding error along the
    directions of the few tokens that excite them, onto every other column, where tokens unlike the
    calibration ones pick it up; decoupled, they are rounded to nearest and neither spread nor receive error.
    """
    d = H.diagonal()
    big = d > k * d.median()
    if bool(big.any()):
        keep = d[big].clone()
        H[big, :] = 0.0
        H[:, big] = 0.0
        H[big, big] = keep
    return big


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
            name: str = "", factor: bool = True) -> Prepared:
    """Cast, zero dead columns, damp and factor. Never modifies the caller's tensors.

    ``factor=False`` (GPTQ/SparseGPT) leaves damping and factoring to :func:`inverse_factor`, which
    needs a Cholesky of the permuted H rather than of H.
    """
    W = W.to(dtype=dtype, copy=True)
    H = H.to(device=W.device, dtype=dtype, copy=True)
    dead = H.diagonal() == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        log.info("layer %s: %d dead input(s) (H_ii = 0); their weight columns are zeroed",
                 name or "?", int(dead.sum()))
    if not factor:
        return Prepared(W, H, None, dead, 0.0, 0, damp, name)
    L, lam, retries = damped_cholesky(H, damp, name)
    H.diagonal().add_(lam)
    return Prepared(W, H, L, dead, lam, retries, damp, name)


def inverse_factor(prep: Prepared, perm: torch.Tensor) -> torch.Tensor:
    """U upper with U^T U = (H^-1)[perm][:, perm], the Cholesky of the inverse that GPTQ/SparseGPT walk.

    With J the reversal, J Hp J = M M^T (Hp = H[perm][:, perm]) gives Hp = K K^T with K = J M J
    upper, so U = K^-1 = J M^-1 J: one Cholesky and one triangular solve (no explicit inverse,
    30 % less work and half the round-off of inverting then factoring). The Cholesky is the
    positive-definiteness test: an unfactored `prep` is damped here (prep.H, lam, retries updated),
    in its precision first and in float64 when float32 round-off is what fails.
    """
    rev = perm.flip(0)
    Hp = prep.H[rev[:, None], rev]  # J Hp J in one gather
    if prep.L is not None:  # already damped and known positive definite
        M = torch.linalg.cholesky(Hp)
    else:
        lam = prep.damp * Hp.diagonal().mean().item()
        Hp.diagonal().add_(lam)
        M, info = torch.linalg.cholesky_ex(Hp)
        retries = 0
        if int(info) != 0 or not bool(torch.isfinite(M.diagonal()).all()):
            Hp.diagonal().sub_(lam)
            M, lam, retries = damped_cholesky(Hp.double(), prep.damp, prep.name)
        prep.H.diagonal().add_(lam)
        prep.lam, prep.retries = lam, retries
    eye = torch.eye(len(M), dtype=M.dtype, device=M.device)
    return torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1).to(prep.H.dtype)


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(tr(dW H dW^T), tr(dW H dW^T) / tr(W H W^T)) with the caller's H, in its precision (>= float32)."""
    dt = torch.promote_types(H.dtype, torch.float32)
    H = H.to(device=W.device, dtype=dt)
    W2 = W.reshape(W.shape[0], -1).to(dt)
    D = W_hat.reshape(W2.shape).to(dt) - W2
    loss = torch.sum((D @ H) * D).item()
    ref = torch.sum((W2 @ H) * W2).item()
    return loss, loss / ref if ref > 0 else 0.0
