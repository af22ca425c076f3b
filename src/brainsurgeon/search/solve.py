"""One database unit of work: compress one weight with a chain of configs (a pure, picklable function)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..calib import set_weight_matrix_, weight_matrix
from ..config import Config
from ..obs import compress_weight
from ..obs.hessian import layer_loss


def solve_variant(W: torch.Tensor, H: torch.Tensor, configs: tuple[Config, ...],
                  name: str = "") -> tuple[torch.Tensor, float, float, float]:
    """Apply `configs` in order (e.g. ExactOBS 2:4 then OBQ 4-bit) to W with Hessian H.

    A ``LowRank`` config (alone) gives the rank-r activation-aware reconstruction instead
    (:func:`.factored.solve_lowrank`); a ``Separable`` config (alone) the data-aware compact design's
    equivalent kernel (:func:`.factored.solve_separable`).

    W: the layer weight (rows x cols, or a conv kernel out x in/g x k...); H: (cols, cols), or
    (g, cols, cols) for a grouped conv whose group j owns rows [j*out/g, (j+1)*out/g).
    Returns (W_hat, tr(dW H dW^T), relative loss, seconds), the loss against the original W.

    >>> W_hat, loss, rel, sec = solve_variant(W, H, (ExactOBS(pattern="2:4"), OBQ(bits=4)))
    """
    t0 = time.perf_counter()
    if configs and type(configs[0]).verb == "factorize":  # a low-rank variant (one LowRank config, groups=1)
        from .factored import solve_lowrank

        W_hat, loss, rel = solve_lowrank(W, H, configs[0].rank, configs[0].damp)
        return W_hat, loss, rel, time.perf_counter() - t0
    if configs and type(configs[0]).verb == "transform":  # a compact design (one Separable config, k x k conv)
        from .factored import solve_separable

        W_hat, loss, rel = solve_separable(W, H, configs[0])
        return W_hat, loss, rel, time.perf_counter() - t0
    configs = tuple(c for c in configs if type(c).verb != "actquant")  # acts: already in H (built from X_q)
    Hs = H if H.dim() == 3 else H.unsqueeze(0)  # (g, cols, cols)
    parts = W.chunk(Hs.shape[0], dim=0)
    out, loss, ref = [], 0.0, 0.0
    for i, Wg in enumerate(parts):
        cur = Wg
        for cfg in configs:
            cur = compress_weight(cur, Hs[i], cfg, name).weight
        loss += layer_loss(Wg, cur, Hs[i])[0]
        ref += layer_loss(Wg, torch.zeros_like(Wg), Hs[i])[0]  # tr(W H W^T)
        out.append(cur)
    W_hat = torch.cat(out)  # (rows, ...) as W
    return W_hat, loss, (loss / ref if ref > 0 else 0.0), time.perf_counter() - t0


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the solvers see it (detached): conv kernels keep their shape, others rows x cols."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight.detach()
    return weight_matrix(module)


def set_layer_weight_(module: nn.Module, W: torch.Tensor) -> None:
    """Write a weight in :func:`layer_weight`'s layout back into the module (no autograd)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        with torch.no_grad():
            module.weight.copy_(W.reshape(module.weight.shape).to(module.weight))
    else:
        set_weight_matrix_(module, W)
