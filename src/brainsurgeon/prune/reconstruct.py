"""OBS reconstruction: after channels are removed, re-solve each consumer's remaining weights.

For a consumer layer ``y = W x (+ b)`` whose inputs lost channels, the kept weights are
re-solved so that the pruned layer reproduces the *dense* layer's output on calibration data:

    W' = argmin_M ||X W^T - X' M^T||_F^2 + lam ||M - W_K||_F^2  =  (W A + lam W_K)(B + lam I)^-1

with X (N, cols) the dense model's layer inputs, X' (N, cols') the pruned model's inputs,
A = X^T X', B = X'^T X' (``H = 2 X X^T / n`` in :mod:`brainsurgeon.calib`, up to scale) and
W_K the plainly pruned weight. This is the structured Optimal Brain Surgeon update (Hassibi &
Stork, NIPS 1992) solved exactly per layer as in OBC (Frantar & Alistarh, NeurIPS 2022, eq. 1),
generalised to inputs that changed upstream (sequential, as GPTQ). The proximal term makes
the result never worse than plain removal on the calibration data (``loss_after <= loss_before``).
A bias, when present, is re-solved too (a constant input column).

    >>> rows = reconstruct_(model, dense, ["conv2", "fc1"], calib, kept_rows, damp=0.01)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..calib import layer_columns, move_to
from ..calib.data import model_device
from ..calib.hessian import first_input
from .stats import raw_batches

log = get_logger(__name__)


class _Stop(Exception):
    """Ends a forward pass early, once the wanted layer input has been captured."""


@dataclass
class ReconStats:
    """Second moments of one consumer: G = X^T X, A = X^T X', B = X'^T X' (float64), n samples."""

    G: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    n: int


def solve_reconstruction(W: torch.Tensor, Wk: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         damp: float) -> torch.Tensor:
    """W' = (W A + lam W_K)(B + lam I)^-1 with lam = damp * mean(diag B).

    W: (rows, cols) dense target; Wk: (rows, cols') plain removal; A: (cols, cols'); B: (cols', cols').
    Returns W' (rows, cols') in float64.
    """
    lam = damp * B.diagonal().mean().clamp_min(1e-12)
    Bd = B + lam * torch.eye(B.shape[0], dtype=B.dtype, device=B.device)  # (cols', cols')
    rhs = W.double() @ A + lam * Wk.double()  # (rows, cols')
    L = torch.linalg.cholesky(Bd)
    return torch.cholesky_solve(rhs.T, L).T  # (rows, cols'): solve Bd M^T = rhs^T (Bd symmetric)


def output_error(W: torch.Tensor, M: torch.Tensor, st: ReconStats) -> float:
    """||X W^T - X' M^T||^2 / ||X W^T||^2 from the moments (a relative layer-output error)."""
    W, M = W.double(), M.double()
    ref = torch.trace(W @ st.G @ W.T)
    err = ref - 2 * torch.trace(W @ st.A @ M.T) + torch.trace(M @ st.B @ M.T)
    return float(err.clamp_min(0) / ref.clamp_min(1e-30))


def _matrix(mod: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Weight as (rows, cols), with the bias appended as a last column when there is one."""
    W = mod.weight.detach().reshape(mod.weight.shape[0], -1)  # (out, in * k)
    if mod.bias is not None:
        W = torch.cat([W, mod.bias.detach().unsqueeze(1)], 1)  # (out, cols + 1)
    return W if rows is None else W[rows.to(W.device)]


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cols = layer_columns(mod, x).double()  # (N, cols)
    if mod.bias is not None:
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)  # constant column for the bias
    return cols


def _capture(model: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input of module `name` on this batch (the forward stops right after it)."""
    box: dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        box["x"] = first_input(a, kw).detach()
        raise _Stop

    h = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(*args, **kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    if "x" not in box:
        raise RuntimeError(f"layer {name!r} was not reached by the calibration forward")
    return box["x"]


def consumer_stats(model: nn.Module, dense: nn.Module, name: str, batches: list[Any]) -> ReconStats:
    """Accumulate G, A, B of consumer `name` over the batches (dense vs pruned inputs)."""
    mod, dmod = model.get_submodule(name), dense.get_submodule(name)
    dev = mod.weight.device
    G = A = B = None
    n = 0
    for args, kwargs in batches:
        X = _columns(dmod, _capture(dense, name, args, kwargs)).to(dev)  # (N, cols)
        Xp = _columns(mod, _capture(model, name, args, kwargs)).to(dev)  # (N, cols')
        if G is None:
            G, A, B = X.T @ X, X.T @ Xp, Xp.T @ Xp
        else:
            G += X.T @ X
            A += X.T @ Xp
            B += Xp.T @ Xp
        n += X.shape[0]
    return ReconStats(G, A, B, n)  # type: ignore[arg-type]


def _execution_order(model: nn.Module, names: list[str], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> list[str]:
    order: list[str] = []
    handles = []
    try:
        for n in names:
            def hook(m: nn.Module, a: Any, n: str = n) -> None:
                order.append(n)
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    once = [n for n in dict.fromkeys(order) if order.count(n) == 1]
    skipped = sorted(set(names) - set(once))
    if skipped:
        log.warning("OBS reconstruction skips %s (not reached, or called more than once per forward)", skipped)
    return once


def reconstruct_(model: nn.Module, dense: nn.Module, names: list[str], calib: Any,
                 kept_rows: Callable[[str], torch.Tensor | None], damp: float = 0.01,
                 max_batches: int = 0) -> list[tuple[str, float, float]]:
    """Re-solve every consumer in `names` in execution order; returns (name, err_before, err_after).

    `dense` is the unpruned model (same module names); ``kept_rows(name)`` gives the original
    output rows the consumer still has (None: all). Errors are relative layer-output errors
    ``||X W^T - X' M^T||^2 / ||X W^T||^2`` before (plain removal) and after the re-solve.
    """
    device = model_device(model)
    batches = [move_to((a, k), device) for a, k, _ in raw_batches(calib, max_batches)]
    out = []
    was = (model.training, dense.training)
    try:
        model.eval()
        dense.eval()
        with torch.no_grad():
            for name in _execution_order(model, names, *batches[0]):
                mod = model.get_submodule(name)
                st = consumer_stats(model, dense, name, batches)
                W = _matrix(dense.get_submodule(name), kept_rows(name)).to(mod.weight.device)  # (rows, cols)
                Wk = _matrix(mod)  # (rows, cols')
                M = solve_reconstruction(W, Wk, st.A, st.B, damp)
                before, after = output_error(W, Wk, st), output_error(W, M, st)
                if not after <= before + 1e-9:  # the proximal term guarantees it; guard round-off
                    M, after = Wk.double(), before
                cols = mod.weight[0].numel()
                mod.weight.copy_(M[:, :cols].reshape(mod.weight.shape).to(mod.weight.dtype))
                if mod.bias is not None:
                    mod.bias.copy_(M[:, cols].to(mod.bias.dtype))
                out.append((name, before, after))
                log.info("OBS reconstruction %s: rel. output error %.3e -> %.3e", name, before, after)
    finally:
        model.train(was[0])
        dense.train(was[1])
    return out
