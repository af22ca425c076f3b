"""Compact-design factorizations of a k x k conv, fitted to the layer OUTPUT on calibration data.

A conv ``Y = W X`` (W: T x S*kh*kw, X: the unfolded input columns) is replaced by a cheaper design
whose equivalent kernel ``W_hat`` is multilinear in its factors:

* ``"spatial"`` (Jaderberg, Vedaldi & Zisserman, "Speeding up Convolutional Neural Networks with Low
  Rank Expansions", BMVC 2014, scheme 2): a (kh x 1) conv S -> R, then a (1 x kw) conv R -> T;
  ``W_hat[t,s,i,j] = sum_r Hh[t,r,j] V[r,s,i]``.
* ``"depthwise"`` (Howard et al., "MobileNets", 2017; Chollet, "Xception", CVPR 2017): a depthwise
  k x k conv with m filters per input channel, then a pointwise 1x1 conv S*m -> T;
  ``W_hat[t,s,q] = sum_a P[t,s,a] D[s,a,q]`` (q = (i, j)).
* ``"bottleneck"`` (1x1 reduce, k x k on fewer channels, 1x1 expand; the Tucker-2 structure of Kim
  et al., ICLR 2016): ``W_hat = G x_0 U x_1 V``.

Weight-space fitting minimises ``||W - W_hat||_F^2`` in closed form (a per-channel / reshaped SVD,
HOOI for the bottleneck). Data-aware fitting minimises the layer's output error on calibration inputs,
``||Y - Y_hat||_F^2 = tr((W - W_hat) H (W - W_hat)^T)`` with ``H = X X^T`` (up to scale, the Hessian the
calibration driver collects), by alternating least squares from the weight-space solution: each sweep
solves the normal equations ``J^T (J f H) = J^T (W H)`` of one factor f with the others fixed (W_hat = J f
is linear in f) by conjugate gradients, matrix-free. CG iterates never increase the quadratic, and the
best sweep is kept, so the output error is never above the weight-space fit's on the same data::

    >>> fit = fit_separable(W4, H, "depthwise", rank=2)        # W4: (T, S, kh, kw)
    >>> fit.loss <= fit.init_loss
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .tucker import reconstruct, tucker2

KINDS = ("spatial", "depthwise", "bottleneck")


@dataclass
class SeparableFit:
    """Factors (float64) of one design, their output error and the weight-space starting point's."""

    kind: str
    factors: list[torch.Tensor]  # spatial: [V (R,S,kh), Hh (T,R,kw)]; depthwise: [D (S,m,kk), P (T,S,m)];
    #                              bottleneck: [U (T,Ro), G (Ro,Ri,kh,kw), V (S,Ri)]
    loss: float  # tr(dW H dW^T) (||dW||^2 without H) of the returned factors
    init_loss: float  # the same for the weight-space (closed-form / HOOI) fit
    total: float  # tr(W H W^T): loss / total is the relative output error
    sweeps: int  # ALS sweeps run


def dense_kernel(kind: str, factors: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The equivalent kernel (T, S, kh, kw) of a design's factors."""
    T, S, kh, kw = shape
    if kind == "spatial":
        V, Hh = factors
        return torch.einsum("trj,rsi->tsij", Hh, V)
    if kind == "depthwise":
        D, P = factors
        return torch.einsum("tsa,saq->tsq", P, D).reshape(T, S, kh, kw)
    U, G, V = factors
    return reconstruct(U, G, V)


def output_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` with W, W_hat (T, cols), or ``||W - W_hat||_F^2`` when H is None."""
    dW = (W - W_hat).to(torch.float64)
    if H is None:
        return float((dW * dW).sum())
    return float(((dW @ H.to(dW)) * dW).sum())


def init_weight_space(W4: torch.Tensor, kind: str, rank: int | tuple[int, int],
                      sweeps: int = 2) -> list[torch.Tensor]:
    """The closed-form best fit in ``||W - W_hat||_F`` (bottleneck: HOSVD + `sweeps` HOOI sweeps), float64.

    >>> D, P = init_weight_space(torch.randn(8, 4, 3, 3), "depthwise", 2)
    """
    K = W4.detach().to(torch.float64)
    T, S, kh, kw = K.shape
    if kind == "spatial":  # rank-R SVD of K reshaped to (S*kh, T*kw) (Jaderberg et al. 2014, sec. 3.2)
        R = int(rank)
        M = K.permute(1, 2, 0, 3).reshape(S * kh, T * kw)  # (s,i) x (t,j)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        root = s[:R].sqrt()
        V = (U[:, :R] * root).t().reshape(R, S, kh)  # (S*kh, R) -> (R, S, kh)
        Hh = (root[:, None] * Vh[:R]).reshape(R, T, kw).permute(1, 0, 2)  # (R, T*kw) -> (T, R, kw)
        return [V.contiguous(), Hh.contiguous()]
    if kind == "depthwise":  # per input channel s, rank-m SVD of W[:, s, :] (T x kh*kw)
        m = int(rank)
        U, s, Vh = torch.linalg.svd(K.reshape(T, S, kh * kw).permute(1, 0, 2), full_matrices=False)  # (S,T,r)..
        root = s[:, :m].sqrt()  # (S, m)
        D = root[:, :, None] * Vh[:, :m]  # (S, m, kk)
        P = (U[:, :, :m] * root[:, None, :]).permute(1, 0, 2)  # (S, T, m) -> (T, S, m)
        return [D.contiguous(), P.contiguous()]
    if kind == "bottleneck":
        r_out, r_in = rank  # type: ignore[misc]
        return list(tucker2(K, r_out, r_in, sweeps))
    raise ConfigError(f"unknown separable kind {kind!r}; use one of {list(KINDS)}")


def _cg_solve(apply_A: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor,
              iters: int, tol: float = 1e-10) -> torch.Tensor:
    """Conjugate gradients on ``A x = b`` (A symmetric PSD, given as a function) from x (any shape)."""
    r = b - apply_A(x)
    p, rs = r.clone(), (r * r).sum()
    stop = tol * float((b * b).sum()) + 1e-300
    for _ in range(iters):
        if float(rs) <= stop:
            break
        Ap = apply_A(p)
        pAp = (p * Ap).sum()
        if float(pAp) <= 0:
            break
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum()
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


OUT_FACTOR = {"spatial": 1, "depthwise": 1, "bottleneck": 0}  # the factor whose first dim is T (outputs)


def fit_separable(W4: torch.Tensor, H: torch.Tensor | None, kind: str, rank: int | tuple[int, int],
                  sweeps: int = 10, cg_iters: int = 50, damp: float = 0.01,
                  tucker_sweeps: int = 2, row_scale: torch.Tensor | None = None) -> SeparableFit:
    """Fit one design to a conv kernel W4 (T, S, kh, kw); data-aware when H (S*kh*kw, S*kh*kw) is given.

    rank: R (spatial), m filters per channel (depthwise) or (r_out, r_in) (bottleneck). Without H (or
    with ``sweeps=0``) the weight-space fit is returned. The ALS normal equations use ``H + damp *
    mean(diag H) I``; every sweep is scored on H itself and the best (lowest output error) is kept.
    row_scale (T,): weight output channel t by ``row_scale[t]^2`` in both errors (the BatchNorm that
    follows the conv multiplies channel t by gamma_t / sigma_t): the kernel ``diag(row_scale) W`` is fitted
    and the output-side factor divided back; losses are of the scaled kernel.

    >>> fit = fit_separable(torch.randn(8, 4, 3, 3), torch.eye(36), "spatial", rank=3)
    """
    if row_scale is not None:
        s = row_scale.detach().to(torch.float64).abs()
        s = s.clamp_min(1e-6 * float(s.max().clamp_min(1e-30)))  # (T,)
        fit = fit_separable(W4.to(torch.float64) * s[:, None, None, None], H, kind, rank, sweeps, cg_iters, damp,
                            tucker_sweeps)
        k = OUT_FACTOR[kind]
        fit.factors[k] = fit.factors[k] / s.reshape(-1, *[1] * (fit.factors[k].dim() - 1))
        return fit
    shape = tuple(W4.shape)
    T = shape[0]
    W = W4.detach().to(torch.float64).reshape(T, -1)  # (T, S*kh*kw)
    factors = init_weight_space(W4, kind, rank, tucker_sweeps)

    def loss_of(fs: Sequence[torch.Tensor]) -> float:
        return output_loss(W, dense_kernel(kind, fs, shape).reshape(T, -1), H)

    init = best = loss_of(factors)
    total = output_loss(W, torch.zeros_like(W), H)
    best_fs, ran = [f.clone() for f in factors], 0
    if H is None or sweeps == 0 or init <= 1e-14 * max(total, 1e-300):
        return SeparableFit(kind, best_fs, init, init, total, 0)
    H = H.to(torch.float64)
    Hd = H + damp * float(H.diagonal().mean().clamp_min(1e-12)) * torch.eye(H.shape[0], dtype=H.dtype)
    WH = W @ Hd  # (T, cols)
    for _ in range(sweeps):
        for k in range(len(factors)):
            def build(f: torch.Tensor, k: int = k) -> torch.Tensor:
                fs = list(factors)
                fs[k] = f
                return dense_kernel(kind, fs, shape).reshape(T, -1)  # linear in f: W_hat = J f

            _, vjp = torch.func.vjp(build, factors[k])  # J^T applied to a (T, cols) matrix
            b = vjp(WH)[0]
            factors[k] = _cg_solve(lambda v, build=build, vjp=vjp: vjp(build(v) @ Hd)[0], b, factors[k], cg_iters)
        ran += 1
        cur = loss_of(factors)
        if cur < best:
            best, best_fs = cur, [f.clone() for f in factors]
    return SeparableFit(kind, best_fs, best, init, total, ran)


def design_rank(kind: str, shape: Sequence[int], ratio: float) -> int | tuple[int, int]:
    """The largest rank whose weights stay within ``ratio`` of the dense kernel's (T*S*kh*kw).

    >>> design_rank("depthwise", (64, 32, 3, 3), 0.25)     # m (S*kh*kw + T*S) <= 0.25 T S kh kw
    1
    """
    T, S, kh, kw = shape
    budget = ratio * T * S * kh * kw
    if kind == "spatial":
        return max(1, min(int(budget // (S * kh + T * kw)), S * kh, T * kw))
    if kind == "depthwise":
        return max(1, min(int(budget // (S * kh * kw + T * S)), kh * kw, T))
    if kind == "bottleneck":
        from .config import LowRank
        from .tucker import choose_tucker_ranks

        return choose_tucker_ranks(torch.empty(T, S, kh, kw), LowRank(param_ratio=min(ratio, 0.999)))
    raise ConfigError(f"unknown separable kind {kind!r}; use one of {list(KINDS)}")


def design_params(kind: str, shape: Sequence[int], rank: int | tuple[int, int]) -> int:
    """Weights of a design (bias excluded): spatial ``R (S kh + T kw)``, depthwise ``m (S kh kw + T S)``,
    bottleneck ``S R_in + R_out R_in kh kw + T R_out``."""
    T, S, kh, kw = shape
    if kind == "spatial":
        return int(rank) * (S * kh + T * kw)  # type: ignore[operator]
    if kind == "depthwise":
        return int(rank) * (S * kh * kw + T * S)  # type: ignore[operator]
    r_out, r_in = rank  # type: ignore[misc]
    return S * r_in + r_out * r_in * kh * kw + T * r_out
