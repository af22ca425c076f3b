"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023): migrate activation outliers into the weights before quantizing both.

For a normalization layer (LayerNorm / RMSNorm) whose output X feeds Linear layers W^(1..m) directly,
per input channel j (eq. 4 of the paper)::

    s_j = max|X_j|^alpha / max_i max|W^(i)_j|^(1 - alpha)
    X' = X diag(s)^-1  (folded into the norm: gamma /= s, beta /= s),   W' = W diag(s)

so every W' X' = W X exactly in float, while the channels of X' are flatter (easier to quantize per
tensor) and the outliers live in the weights (quantized per output channel). alpha = 0.5 is the paper's
default for most models; larger alpha moves more of the difficulty into the weights.

    >>> pairs = smooth_quant_(model, calib, alpha=0.5)
    >>> pairs["model.layers.0.input_layernorm"]
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..errors import ConfigError

log = get_logger(__name__)


def is_norm(m: nn.Module) -> bool:
    """LayerNorm, or an RMSNorm-like module (class name ends in ``RMSNorm``/``LayerNorm``) with a 1-D weight."""
    w = getattr(m, "weight", None)
    return (isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))) and \
        isinstance(w, torch.Tensor) and w.dim() == 1


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over the consumers' weights (rows x cols each), eq. 4."""
    w_absmax = torch.stack([W.abs().amax(dim=0) for W in weights]).amax(dim=0)  # (cols,)
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def _observe(model: nn.Module, calib: Any, max_batches: int) -> tuple[dict[str, set[str]], dict[str, torch.Tensor]]:
    """Which Linear layers read a norm's output tensor as-is, and each Linear input's per-channel max |x| over
    the real tokens (padding tokens left out, ``calib.padding.real_rows``)."""
    from ..calib.data import eval_forwards
    from ..calib.padding import real_rows

    norms = {n: m for n, m in model.named_modules() if n and is_norm(m)}
    linears = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear)}
    last_out: dict[int, str] = {}  # id of a norm's latest output tensor -> norm name
    readers: dict[str, set[str]] = {}
    amax: dict[str, torch.Tensor] = {}
    handles = []

    def norm_hook(name: str):
        def fn(m: nn.Module, a: tuple[Any, ...], out: torch.Tensor) -> None:
            last_out[id(out)] = name
        return fn

    def lin_hook(name: str):
        def fn(m: nn.Module, a: tuple[Any, ...]) -> None:
            x = a[0]
            src = last_out.get(id(x))
            if src is not None:
                readers.setdefault(src, set()).add(name)
            cur = real_rows(x.detach()).abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # padding rows out
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return fn

    try:
        for n, m in norms.items():
            handles.append(m.register_forward_hook(norm_hook(n)))
        for n, m in linears.items():
            handles.append(m.register_forward_pre_hook(lin_hook(n), prepend=True))  # before any input quantizer
        eval_forwards(model, calib, max_batches, each=last_out.clear)
    finally:
        for h in handles:
            h.remove()
    return readers, amax


def _fold(norm: nn.Module, mods: list[nn.Module], s: torch.Tensor) -> None:
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    for m in mods:
        m.weight.mul_(s.to(m.weight)[None, :])


def output_probe(model: nn.Module, calib: Any) -> Callable[[], torch.Tensor]:
    """A function giving `model`'s output (float64) on the first calibration batch: a fold that must keep
    the float function (SmoothQuant, cross-layer equalization) is checked against it."""
    from ..calib import iter_batches, move_to
    from ..calib.data import model_device

    args, kwargs = move_to(next(iter(iter_batches(calib, 1))), model_device(model))

    def out() -> torch.Tensor:
        y = model(*args, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else getattr(y, "logits", getattr(y, "last_hidden_state", y))
        return y.detach().double()

    return out


@torch.no_grad()
def smooth_quant_(model: nn.Module, calib: Any, alpha: float = 0.5, names: Iterable[str] | None = None,
                  max_batches: int = 0) -> dict[str, list[str]]:
    """Fold SmoothQuant scales into every (norm -> Linear layers) pair of `model`, in place.

    names: the Linear layers that may be smoothed (default: all); a norm is smoothed only when every
    Linear reading its output is in `names`. Returns {norm name: [Linear names]} of the smoothed pairs.
    The float model computes the same function afterwards (up to rounding).

    >>> smooth_quant_(bert, calib, alpha=0.5)          # then quantize_(bert, ActQuant(bits=8), calib)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"SmoothQuant: alpha (migration strength) must be in [0, 1], got {alpha!r}; e.g. 0.5")
    readers, amax = _observe(model, calib, max_batches)
    allowed = None if names is None else set(names)
    out = output_probe(model, calib)
    done: dict[str, list[str]] = {}
    skipped: list[str] = []
    with eval_mode(model):
        ref = out()
        for norm_name, lins in readers.items():
            lins_sorted = sorted(lins)
            if allowed is not None and not set(lins_sorted) <= allowed:
                continue
            norm = model.get_submodule(norm_name)
            mods = [model.get_submodule(n) for n in lins_sorted]
            if any(m.weight.shape[1] != norm.weight.shape[0] for m in mods):
                continue
            s = smoothing_scales(amax[lins_sorted[0]], [m.weight.detach().float() for m in mods], alpha)
            saved = [t.detach().clone() for t in (norm.weight, getattr(norm, "bias", None), *[m.weight for m in mods])
                     if t is not None]
            _fold(norm, mods, s.to(norm.weight))
            if float((out() - ref).norm() / ref.norm().clamp_min(1e-30)) > 1e-4:  # the norm's output also feeds
                live = [t for t in (norm.weight, getattr(norm, "bias", None), *[m.weight for m in mods])
                        if t is not None]
                for t, v in zip(live, saved, strict=True):  # something else (a post-norm residual): undo
                    t.copy_(v)
                skipped.append(norm_name)
                continue
            done[norm_name] = lins_sorted
    if skipped:
        log.info("SmoothQuant: %d norm(s) left as they are: their output also feeds non-Linear consumers "
                 "(e.g. a post-norm residual), where folding would change the model: %s", len(skipped), skipped)
    log.info("SmoothQuant (alpha %.2f): %d norms folded into %d Linear layers", alpha, len(done),
             sum(len(v) for v in done.values()))
    return done
