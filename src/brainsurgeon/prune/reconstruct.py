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
A bias, when present, is re-solved too (a constant input column); a bias-free consumer that
feeds a BatchNorm gets the same offset folded into the BN's running mean.

    >>> rows = reconstruct_(model, dense, ["conv2", "fc1"], calib, kept_rows, damp=0.01)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..calib import layer_columns, move_to
from ..calib.data import model_device
from ..calib.hessian import first_input
from ..errors import CalibrationError
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

    >>> Xp = X[:, keep]                                    # the pruned layer's inputs
    >>> M = solve_reconstruction(W, W[:, keep], X.T @ Xp, Xp.T @ Xp, damp=0.01)
    """
    lam = damp * B.diagonal().mean().clamp_min(1e-12)
    Bd = B + lam * torch.eye(B.shape[0], dtype=B.dtype, device=B.device)  # (cols', cols')
    rhs = W.double() @ A + lam * Wk.double()  # (rows, cols')
    L = torch.linalg.cholesky(Bd)
    return torch.cholesky_solve(rhs.T, L).T  # (rows, cols'): solve Bd M^T = rhs^T (Bd symmetric)


def output_error(W: torch.Tensor, M: torch.Tensor, st: ReconStats) -> float:
    """||X W^T - X' M^T||^2 / ||X W^T||^2 from the moments (a relative layer-output error).

    >>> output_error(W, M, ReconStats(X.T @ X, X.T @ Xp, Xp.T @ Xp, len(X)))
    """
    W, M = W.double(), M.double()
    ref = torch.trace(W @ st.G @ W.T)
    err = ref - 2 * torch.trace(W @ st.A @ M.T) + torch.trace(M @ st.B @ M.T)
    return float(err.clamp_min(0) / ref.clamp_min(1e-30))


def _matrix(mod: nn.Module, rows: torch.Tensor | None = None, bias: bool = False) -> torch.Tensor:
    """Weight as (rows, cols), with the bias (or zeros) appended as a last column when `bias`."""
    W = mod.weight.detach().reshape(mod.weight.shape[0], -1)  # (out, in * k)
    if bias:
        b = mod.bias.detach() if mod.bias is not None else torch.zeros_like(W[:, 0])
        W = torch.cat([W, b.unsqueeze(1)], 1)  # (out, cols + 1)
    return W if rows is None else W[rows.to(W.device)]


def _columns(mod: nn.Module, x: torch.Tensor, bias: bool) -> torch.Tensor:
    cols = layer_columns(mod, x).double()  # (N, cols)
    if bias:
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)  # constant column for the bias
    return cols


@contextmanager
def _hooks(model: nn.Module, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    handles = []
    try:
        for n in names:
            def hook(m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], n: str = n) -> None:
                fn(n, first_input(a, kw).detach())
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _capture(model: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input of module `name` on this batch (the forward stops right after it)."""
    box: dict[str, torch.Tensor] = {}

    def grab(n: str, x: torch.Tensor) -> None:
        box["x"] = x
        raise _Stop

    with _hooks(model, [name], grab):
        try:
            model(*args, **kwargs)
        except _Stop:
            pass
    if "x" not in box:
        raise CalibrationError(f"layer {name!r} was not reached by the calibration forward")
    return box["x"]


def _stats(dmod: nn.Module, mod: nn.Module, xd: torch.Tensor, xp: torch.Tensor, bias: bool,
           chunk: int = 8) -> ReconStats:
    """G, A, B of one consumer from its dense and pruned inputs (columns built `chunk` samples at a time)."""
    dev = mod.weight.device
    acc: list[Any] = [0, 0, 0, 0]
    for a, b in zip(xd.split(chunk), xp.split(chunk), strict=True):
        X = _columns(dmod, a, bias).to(dev)  # (N, cols)
        Xp = _columns(mod, b, bias).to(dev)  # (N, cols')
        acc = [acc[0] + X.T @ X, acc[1] + X.T @ Xp, acc[2] + Xp.T @ Xp, acc[3] + X.shape[0]]
    return ReconStats(*acc)


def _concat(batches: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """All calibration batches as one (args, kwargs), or None when they do not concatenate."""
    (args0, kw0) = batches[0]
    try:
        args = tuple(torch.cat([b[0][i] for b in batches]) if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args0))
        kwargs = {k: torch.cat([b[1][k] for b in batches]) if isinstance(v, torch.Tensor) else v
                  for k, v in kw0.items()}
    except (RuntimeError, IndexError, KeyError, TypeError):
        return None
    return args, kwargs


def _plan_order(model: nn.Module, names: list[str], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Consumers in execution order (those run exactly once) and the BatchNorm reading each one's output."""
    order: list[str] = []
    outs: dict[str, torch.Tensor] = {}
    follower: dict[str, str] = {}
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = []

    def on_bn(n: str, x: torch.Tensor) -> None:
        for c, y in outs.items():  # the very tensor the consumer returned (x is a detached view of it)
            if isinstance(y, torch.Tensor) and y.data_ptr() == x.data_ptr() and y.shape == x.shape:
                follower.setdefault(c, n)

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(
                lambda m, a, y, n=n: outs.__setitem__(n, y)))
        with _hooks(model, names, lambda n, x: order.append(n)), _hooks(model, bns, on_bn), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    once = [n for n in dict.fromkeys(order) if order.count(n) == 1]
    skipped = sorted(set(names) - set(once))
    if skipped:
        log.warning("OBS reconstruction skips %s (not reached, or called more than once per forward)", skipped)
    return once, follower


def reconstruct_(model: nn.Module, dense: nn.Module, names: list[str], calib: Any,
                 kept_rows: Callable[[str], torch.Tensor | None], damp: float = 0.01,
                 max_batches: int = 0) -> list[tuple[str, float, float]]:
    """Re-solve every consumer in `names` in execution order; returns (name, err_before, err_after).

    `dense` is the unpruned model (same module names); ``kept_rows(name)`` gives the original
    output rows the consumer still has (None: all). Sequential (GPTQ-style): each consumer is
    solved on inputs produced by the already re-solved layers before it. The calibration batches
    run as one batch: one dense forward stores every consumer's input, then one pruned forward
    re-solves each consumer in its forward pre-hook, just before it runs (memory: the dense
    inputs of all consumers on the whole calibration set). Batches that do not concatenate fall
    back to two early-stopped forwards per consumer. A consumer without a bias that feeds a
    BatchNorm gets its re-solved offset folded into the BN's ``running_mean``. Errors are
    ``||X W^T - X' M^T||^2 / ||X W^T||^2`` on the calibration data: plain removal vs re-solved.
    """
    device = model_device(model)
    batches = [move_to((a, k), device) for a, k, _ in raw_batches(calib, max_batches)]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    with eval_mode(model, dense), torch.no_grad():
        order, follower = _plan_order(model, names, *batches[0])
        bias = {n: model.get_submodule(n).bias is not None or n in follower for n in order}
        anchor = {n: _matrix(model.get_submodule(n), None, bias[n]) for n in order}  # plain removal
        means = {}  # dense running means of the BNs that absorb a bias-free consumer's offset
        for n in order:
            if model.get_submodule(n).bias is None and n in follower:
                rows = kept_rows(n)
                rm = dense.get_submodule(follower[n]).running_mean
                means[n] = rm if rows is None else rm[rows.to(rm.device)]
                anchor[n][:, -1] = means[n] - model.get_submodule(follower[n]).running_mean  # offset so far
        def solve(n: str, st: ReconStats) -> None:
            first[n], last[n] = _solve_one(model, dense, n, st, anchor[n], kept_rows(n), damp,
                                           follower.get(n), means.get(n))

        cat = _concat(batches)
        if cat is not None:  # one dense forward, then one pruned forward that re-solves as it goes
            xd: dict[str, torch.Tensor] = {}
            with _hooks(dense, order, xd.__setitem__):
                dense(*cat[0], **cat[1])
            with _hooks(model, order, lambda n, x: solve(n, _stats(
                    dense.get_submodule(n), model.get_submodule(n), xd.pop(n), x, bias[n]))):
                model(*cat[0], **cat[1])
        else:  # batches of different shapes: two forwards per batch per consumer, stopped early
            for n in order:
                solve(n, _sequential_moments(model, dense, n, batches, bias[n]))
    for n in last:
        log.info("OBS reconstruction %s: rel. output error %.3e -> %.3e", n, first[n], last[n])
    return [(n, first[n], last[n]) for n in last]


def _sequential_moments(model: nn.Module, dense: nn.Module, name: str, batches: list[Any],
                        bias: bool) -> ReconStats:
    mod, dmod = model.get_submodule(name), dense.get_submodule(name)
    acc: list[Any] = [0, 0, 0, 0]
    for args, kwargs in batches:
        X = _columns(dmod, _capture(dense, name, args, kwargs), bias).to(mod.weight.device)  # (N, cols)
        Xp = _columns(mod, _capture(model, name, args, kwargs), bias).to(mod.weight.device)  # (N, cols')
        acc = [acc[0] + X.T @ X, acc[1] + X.T @ Xp, acc[2] + Xp.T @ Xp, acc[3] + X.shape[0]]
    return ReconStats(*acc)


def _solve_one(model: nn.Module, dense: nn.Module, name: str, st: ReconStats, Wk: torch.Tensor,
               rows: torch.Tensor | None, damp: float, bn: str | None,
               mean: torch.Tensor | None) -> tuple[float, float]:
    """Re-solve one consumer from its moments and write weight (+ bias, or the BN's running_mean)."""
    mod = model.get_submodule(name)
    use_bias = Wk.shape[1] == mod.weight[0].numel() + 1
    W = _matrix(dense.get_submodule(name), rows, use_bias).to(mod.weight.device)  # (rows, cols)
    M = solve_reconstruction(W, Wk, st.A, st.B, damp)
    before, after = output_error(W, Wk, st), output_error(W, M, st)
    if not after <= before + 1e-9:  # the proximal term guarantees it; guard round-off
        M, after = Wk.double(), before
    cols = mod.weight[0].numel()
    mod.weight.copy_(M[:, :cols].reshape(mod.weight.shape).to(mod.weight.dtype))
    if mod.bias is not None:
        mod.bias.copy_(M[:, cols].to(mod.bias.dtype))
    elif use_bias and bn is not None and mean is not None:
        rm = model.get_submodule(bn).running_mean
        rm.copy_(mean.to(rm.device) - M[:, cols].to(rm.dtype))  # BN(y + b) == BN with running_mean - b (eval)
    return before, after
