"""`compress_weight(W, H, cfg)`: the one entry point of every layer-wise solver.

Solvers register per config type beside their implementation; this module validates the
inputs, lays columns out for the pattern, times the solve, and measures the loss with the
caller's H::

    >>> res = compress_weight(torch.randn(64, 128), 2 * X.T @ X / len(X), ExactOBS(sparsity=0.5))
    >>> res.weight.shape, res.loss, res.info["damp_retries"]
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch

from .._log import get_logger
from ..config import Config, Pattern
from ..errors import ConfigError, UnsupportedModuleError
from .hessian import layer_loss
from .result import LayerResult

log = get_logger(__name__)

# solver(W rows x cols float64, H cols x cols float64, cfg, perm, name) -> (W_hat, info)
Solver = Callable[[torch.Tensor, torch.Tensor, Config, torch.Tensor, str], tuple[torch.Tensor, dict]]
_SOLVERS: dict[type, Solver] = {}
_DATA_FREE: set[type] = set()


def register_solver(cfg_type: type[Config], data_free: bool = False) -> Callable[[Solver], Solver]:
    """Decorator registering `fn` as the solver of configs of type `cfg_type`.

    ``data_free=True``: the solver never reads H (round-to-nearest, magnitude), so it runs with
    ``H=None`` and the verbs run it without calibration data or a forward pass.
    """

    def deco(fn: Solver) -> Solver:
        if cfg_type in _SOLVERS:
            raise ValueError(f"a solver for {cfg_type.__name__} is already registered")
        _SOLVERS[cfg_type] = fn
        if data_free:
            _DATA_FREE.add(cfg_type)
        return fn

    return deco


def is_data_free(cfg: Config) -> bool:
    """Whether `cfg`'s solver ignores the Hessian (so it needs no calibration data).

    >>> is_data_free(RTN(bits=4)), is_data_free(GPTQ(bits=4))
    (True, False)
    """
    return type(cfg) in _DATA_FREE


def column_perm(shape: tuple[int, ...], pattern: Pattern | None, name: str = "") -> torch.Tensor:
    """Column order in which N:M groups / c-blocks are consecutive.

    Linear (rows x cols): the identity; groups run along the input features. Conv
    (out x in x k...): channels-last, so groups run along input channels at a fixed kernel
    position. Checks that the group size divides the grouped dimension.
    """
    cin, spatial = shape[1], 1
    for s in shape[2:]:
        spatial *= s
    perm = torch.arange(cin * spatial).reshape(cin, spatial).t().flatten()
    size = pattern.m if pattern and pattern.kind == "nm" else (pattern.block if pattern else 1)
    if cin % size:
        what = "input channels" if len(shape) > 2 else "input features"
        raise ConfigError(f"layer {name or '?'}: {what} = {cin} is not divisible by the group size {size} "
                          f"of the pattern; use a pattern whose group size divides {cin}, or pass "
                          f"ignore=['{name}'] to skip this layer")
    return perm


_LAST_H: dict[str, tuple] = {}  # one entry: the caller's H (weakly) -> its float64 copy


def _float64(H: torch.Tensor, device: torch.device) -> torch.Tensor:
    """H as float64 on `device`; the same tensor again for the same unmodified H (layers sharing an
    input share H, so solvers can reuse its factorisation)."""
    hit = _LAST_H.get("h")
    if hit is not None and hit[0]() is H and hit[1] == H._version and hit[2].device == device:
        return hit[2]
    H64 = H.to(device=device, dtype=torch.float64)
    _LAST_H["h"] = (weakref.ref(H, lambda _: _LAST_H.clear()), H._version, H64)
    return H64


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of `t` is finite: one reduction, the elementwise test only if the sum is not."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def count_nonzero(t: torch.Tensor) -> int:
    """Nonzero entries of `t` (-0.0 is zero); float32 on the CPU is counted on its bits with the sign
    masked off, about 1.5x faster than the float compare of ``torch.count_nonzero``."""
    if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
        return int(torch.count_nonzero(t.view(torch.int32) & 0x7FFFFFFF))
    return int(torch.count_nonzero(t))


def _validate(W: torch.Tensor, H: torch.Tensor | None, name: str) -> None:
    if not torch.is_floating_point(W):
        raise UnsupportedModuleError(f"layer {name or '?'}: weight dtype {W.dtype} is not floating point; "
                                     f"OBS solvers need a float weight (dequantize it first)")
    if W.dim() < 2:
        raise UnsupportedModuleError(f"layer {name or '?'}: weight of shape {tuple(W.shape)} has no "
                                     f"input dimension; expected rows x cols or a conv kernel")
    cols = W[0].numel()
    if H is not None and H.shape != (cols, cols):
        raise ConfigError(f"layer {name or '?'}: Hessian shape {tuple(H.shape)} does not match the "
                          f"weight's {cols} input columns; expected ({cols}, {cols})")
    if (H is not None and not all_finite(H)) or not all_finite(W):
        raise ConfigError(f"layer {name or '?'}: weight or Hessian contains NaN/Inf; check the model "
                          f"and the calibration data")


DEAD_WARN = 0.5  # warn (and note in the report) when more than this fraction of inputs is dead


def _degenerate(H: torch.Tensor, cfg: Config, name: str) -> tuple[Config, str]:
    """The config to solve with and a warning when the calibration gave (nearly) no information.

    H_ii = 0 means input i was always zero on the calibration data ("dead"); OBS then zeroes its
    weight column. With every input dead (or H below float32's smallest normal), OBS would return
    an all-zero layer, so the layer gets the data-free baseline instead (RTN on the same grid, or
    magnitude pruning with the same pattern), and a warning. Mostly dead inputs only warn.
    """
    from ..config import RTN, Magnitude

    if isinstance(cfg, RTN | Magnitude):
        return cfg, ""  # data-free baselines: H is not used
    d = H.diagonal()
    dead = d <= torch.finfo(torch.float32).tiny
    frac = float(dead.float().mean()) if d.numel() else 0.0
    label = f"layer {name or '?'}"
    if frac == 1.0:
        if hasattr(cfg, "bits"):
            fb: Config = RTN(bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size, mse=cfg.mse)  # type: ignore[attr-defined]
        elif hasattr(cfg, "parsed"):
            fb = Magnitude(sparsity=cfg.sparsity, pattern=cfg.pattern)  # type: ignore[attr-defined]
        else:
            return cfg, f"{label}: every input is zero on the calibration data (H = 0); check the calibration data"
        return fb, (f"{label}: every one of its {d.numel()} inputs is zero on the calibration data (H = 0), so "
                    f"{cfg.describe()} has no information and would return an all-zero layer; applied "
                    f"{fb.describe()} instead. Check that the calibration data reaches this layer with non-zero "
                    f"inputs, or pass ignore=['{name}']")
    if frac > DEAD_WARN:
        return cfg, (f"{label}: {frac:.0%} of its {d.numel()} inputs are zero on the calibration data (dead); "
                     f"their weight columns were zeroed. If the calibration data is not representative, use "
                     f"more/other batches or pass ignore=['{name}']")
    return cfg, ""


def compress_weight(W: torch.Tensor, H: torch.Tensor | None, cfg: Config, name: str = "") -> LayerResult:
    """Compress one weight with the solver registered for `cfg`.

    W: rows x cols (Linear) or out x in x k... (conv, flattened in PyTorch's order);
    H: cols x cols Hessian 2 X X^T / n of the layer inputs, or None for a data-free config (RTN,
    Magnitude): the loss is then the weight-space ||dW||^2 (H = I). Returns a new tensor; W and H
    are never modified.
    """
    if type(cfg) not in _SOLVERS:
        raise ConfigError(f"no solver registered for {type(cfg).__name__}; registered: "
                          f"{sorted(t.__name__ for t in _SOLVERS)}")
    if H is None and not is_data_free(cfg):
        raise ConfigError(f"layer {name or '?'}: {cfg.describe()} needs the layer's Hessian (calibration data); "
                          f"only data-free configs ({sorted(t.__name__ for t in _DATA_FREE)}) run with H=None")
    _validate(W, H, name)
    cfg, warning = _degenerate(H, cfg, name) if H is not None else (cfg, "")
    if warning:
        log.warning(warning)
    pattern = cfg.parsed if hasattr(cfg, "parsed") else None
    perm = column_perm(tuple(W.shape), pattern, name).to(W.device)
    # solvers work in float64; data-free ones (no H) in the weight's precision (>= float32), like peers
    work = torch.float64 if H is not None else torch.promote_types(W.dtype, torch.float32)
    W2 = W.reshape(W.shape[0], -1).to(work)
    H64 = _float64(H, W.device) if H is not None else None
    t0 = time.perf_counter()
    W_hat, info = _SOLVERS[type(cfg)](W2, H64, cfg, perm, name)
    seconds = time.perf_counter() - t0
    if not all_finite(W_hat):
        raise ConfigError(f"layer {name or '?'}: {cfg.describe()} produced NaN/Inf; raise damp")
    if H is not None:
        loss, rel = layer_loss(W2, W_hat, H)  # in H's precision (float32 from the driver)
    else:
        D = W_hat.reshape(W2.shape).to(W2.dtype) - W2
        loss, ref = float(torch.linalg.vector_norm(D)) ** 2, float(torch.linalg.vector_norm(W2)) ** 2
        rel = loss / ref if ref > 0 else 0.0
    info = {"damp_retries": 0, "dead_inputs": 0, **info, "rel_loss": rel,
            "nonzeros": count_nonzero(W_hat), "warning": warning}
    return LayerResult(W_hat.reshape(W.shape).to(W.dtype), loss, seconds, info)
