"""Uniform quantization grids: per output channel (row) or per (row, column group).

A grid maps w -> scale * (clamp(round(w / scale) + zero, 0, maxq) - zero), with 2^bits levels.
The range is min-max, optionally shrunk by a search that minimises ||w - q(w)||_p, p = 2.4
(the search of GPTQ/OBQ's reference code: 80 shrink factors 1, 0.99, ..., 0.21).

    >>> W = torch.randn(16, 64)
    >>> g = fit_grid(W, bits=4, sym=True, group_size=32)
    >>> Wq = g.quantize(W)                        # every row of a group on <= 16 levels
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Grid:
    """Per-(row, group) scale and zero point; ``group_size = 0`` means one group per row."""

    scale: torch.Tensor  # rows x groups
    zero: torch.Tensor  # rows x groups
    maxq: int
    group_size: int

    def columns(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero expanded to one entry per weight: two rows x cols tensors."""
        if self.group_size == 0:
            return self.scale.expand(-1, cols), self.zero.expand(-1, cols)
        rep = lambda t: t.repeat_interleave(self.group_size, dim=1)[:, :cols]  # noqa: E731
        return rep(self.scale), rep(self.zero)

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        """Round every entry of W (rows x cols) to its grid point."""
        scale, zero = self.columns(W.shape[1])
        return quantize(W, scale.to(W.dtype), zero.to(W.dtype), self.maxq)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round-to-nearest on the grid (broadcasting); returns dequantized values."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


_CHUNK = 1 << 16  # entries of X x shrink factors fit_rows scores at once (256 KiB in float32: cache-sized)


def _minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    same = (xmin == 0) & (xmax == 0)
    xmin = torch.where(same, -torch.ones_like(xmin), xmin)
    xmax = torch.where(same, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def fit_rows(X: torch.Tensor, bits: int, sym: bool, mse: bool,
             grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4):
    """Scale and zero (each shape rows) of one grid per row of X (rows x n).

    The shrink search scores up to ``_CHUNK / X.numel()`` shrink factors in one batched pass (a depthwise
    conv's 3x3 rows take all 80 at once instead of 80 passes of tiny ops); per row the first factor of least
    error wins, as in the reference loop."""
    maxq = 2**bits - 1
    xmin = torch.clamp(X.amin(dim=1), max=0)  # amin/amax: no argmin indices (min(dim=1) is 5x slower)
    xmax = torch.clamp(X.amax(dim=1), min=0)
    scale, zero = _minmax_params(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    shrink = torch.tensor([1 - i / grid for i in range(int(maxshrink * grid))], dtype=torch.float64)
    shrink = shrink.to(dtype=X.dtype, device=X.device)[:, None]  # (factors, 1)
    best = torch.full_like(scale, float("inf"))
    step = max(1, _CHUNK // max(1, X.numel()))
    for j in range(0, len(shrink), step):
        p = shrink[j:j + step]
        s, z = _minmax_params(p * xmin, p * xmax, maxq, sym)  # (factors, rows)
        err = (quantize(X, s[..., None], z[..., None], maxq) - X).abs_().pow_(norm).sum(-1)
        err, i = err.min(0)  # the first factor of least error in this chunk
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s.gather(0, i[None])[0], scale)
        zero = torch.where(better, z.gather(0, i[None])[0], zero)
    return scale, zero


def fit_grid(W: torch.Tensor, bits: int, sym: bool = True, group_size: int = 0, mse: bool = True) -> Grid:
    """Fit a grid to W (rows x cols): per row, or per row and group of `group_size` columns."""
    rows, cols = W.shape
    if group_size == 0 or group_size >= cols:
        s, z = fit_rows(W, bits, sym, mse)
        return Grid(s[:, None], z[:, None], 2**bits - 1, 0)
    ng = -(-cols // group_size)
    pad = ng * group_size - cols
    Wp = torch.nn.functional.pad(W, (0, pad)) if pad else W  # zero padding keeps min <= 0 <= max
    s, z = fit_rows(Wp.reshape(rows * ng, group_size), bits, sym, mse)  # (rows*ng) grids
    return Grid(s.reshape(rows, ng), z.reshape(rows, ng), 2**bits - 1, group_size)
