"""Integer codes of a weight on a uniform grid: from a fitted grid, or recovered from on-grid weights.

A weight on a ``bits``-bit grid is ``W[r, c] = scale[r, g] * (q[r, c] - zero[r, g])`` with integer
codes ``q`` in ``[0, 2^bits - 1]`` and an integer ``zero`` per (row, group of ``group_size``
columns), as :mod:`brainsurgeon.quant.grid` defines it. The solvers of :mod:`brainsurgeon.obs`
(OBQ, GPTQ, RTN) leave the model's float weights *on* such a grid but do not keep the grid, so
:func:`recover_codes` reads the grid back from the weights themselves: every value of a group is an
integer multiple ``k * scale`` (``k = q - zero``), so ``scale`` is the largest step that divides
them all (an approximate GCD, found exactly because ``|k| <= 2^bits - 1``)::

    >>> g = fit_grid(W, bits=4, group_size=64)
    >>> Wq = g.quantize(W)                        # what quantize_(..., RTN(bits=4, group_size=64)) leaves
    >>> c = recover_codes(Wq, bits=4, group_size=64)
    >>> torch.equal(c.dequantize(), Wq)           # True up to float32 rounding of the scale (<= 1 ulp)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .grid import Grid


@dataclass
class GridCodes:
    """Codes and per-(row, group) scale/zero of a rows x cols weight; groups of `group_size` columns."""

    q: torch.Tensor  # rows x cols, int32 in [0, 2^bits - 1]
    scale: torch.Tensor  # rows x groups, float32
    zero: torch.Tensor  # rows x groups, float32 holding integers in [0, 2^bits - 1]
    bits: int
    group_size: int  # columns per group; divides cols

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero expanded to rows x cols."""
        return (self.scale.repeat_interleave(self.group_size, dim=1),
                self.zero.repeat_interleave(self.group_size, dim=1))

    def dequantize(self) -> torch.Tensor:
        """``scale * (q - zero)`` as a float32 rows x cols tensor."""
        s, z = self.columns()
        return s * (self.q.to(s.dtype) - z)


def check_group_size(cols: int, group_size: int, name: str = "") -> int:
    """The effective group size (``0`` means one group per row, i.e. ``cols``); must divide `cols`."""
    gs = cols if group_size in (0, cols) else group_size
    if gs <= 0 or cols % gs:
        raise ConfigError(f"layer {name or '?'}: group_size={group_size} does not divide in_features={cols}; "
                          f"packed groups must tile the input features exactly: use a group size that "
                          f"divides {cols} (or 0 for one group per output channel), or ignore this layer")
    return gs


def codes_from_grid(W: torch.Tensor, grid: Grid, name: str = "") -> GridCodes:
    """Round W (rows x cols) onto `grid` (from :func:`~brainsurgeon.quant.grid.fit_grid`) and keep the codes.

    >>> c = codes_from_grid(W, fit_grid(W, bits=4, group_size=32))
    >>> (c.dequantize() - fit_grid(W, 4, group_size=32).quantize(W)).abs().max()   # 0
    """
    rows, cols = W.shape
    gs = check_group_size(cols, grid.group_size, name)
    scale, zero = grid.columns(cols)  # rows x cols each
    q = torch.clamp(torch.round(W / scale) + zero, 0, grid.maxq)
    # one (scale, zero) per group: the grid's own, or the per-row one repeated
    s = scale[:, ::gs].to(torch.float32).contiguous()  # rows x groups
    z = zero[:, ::gs].to(torch.float32).contiguous()
    return GridCodes(q.to(torch.int32), s, z, (grid.maxq + 1).bit_length() - 1, gs)


def _step(V: torch.Tensor, maxq: int, tol: float) -> torch.Tensor:
    """Largest s per row of V (n x m, float64) with every V / s an integer in [-maxq, maxq]; NaN if none."""
    a = V.abs().amax(dim=1)  # n: the largest |k| * s of each group
    step = torch.full_like(a, float("nan"))
    step[a == 0] = 1.0  # an all-zero group: any step
    todo = torch.nonzero(a > 0).flatten()
    for k in range(1, maxq + 1):  # the smallest k (largest step) that divides every entry
        if todo.numel() == 0:
            break
        s = a[todo] / k
        r = V[todo] / s[:, None]
        ok = (r - r.round()).abs().amax(dim=1) < tol
        step[todo[ok]] = s[ok]
        todo = todo[~ok]
    return step


def recover_codes(W: torch.Tensor, bits: int, group_size: int = 0, name: str = "") -> GridCodes:
    """Read back the codes of a weight that already lies on a `bits`-bit grid (per row or per group).

    Raises ConfigError naming the layer and the group when a group has more distinct levels than
    ``2^bits`` or values that are not multiples of one step (the weight is not on such a grid).

    >>> c = recover_codes(model.fc1.weight.detach(), bits=4, group_size=128)   # after quantize_(..., GPTQ(bits=4))
    """
    rows, cols = W.shape
    gs = check_group_size(cols, group_size, name)
    maxq = 2**bits - 1
    V = W.detach().to(torch.float64).reshape(rows * (cols // gs), gs)  # (rows*groups) x gs
    step = _step(V, maxq, tol=0.25 / (maxq + 1))
    k = torch.round(V / step.nan_to_num(1.0)[:, None])  # signed codes q - zero
    kmin, kmax = k.amin(dim=1), k.amax(dim=1)
    bad = step.isnan() | (kmax - kmin > maxq)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        r, g = divmod(i, cols // gs)
        raise ConfigError(f"layer {name or '?'}: weights of row {r}, columns {g * gs}..{(g + 1) * gs - 1} are "
                          f"not on a {bits}-bit grid ({int(V[i].unique().numel())} distinct values, not "
                          f"all multiples of one step within 2^{bits} levels); quantize the layer first "
                          f"(quantize_ with RTN/GPTQ/OBQ bits={bits}, group_size dividing {gs}) or pack "
                          f"with rtn=True to round it")
    mid = float(2 ** (bits - 1))  # the symmetric grid's zero; kept whenever the codes fit around it
    zero = torch.minimum(torch.maximum(torch.full_like(kmin, mid), -kmin), maxq - kmax)
    denom = (k * k).sum(dim=1)
    step = torch.where(denom > 0, (V * k).sum(dim=1) / denom.clamp_min(1), step)  # least-squares step
    q = (k + zero[:, None]).to(torch.int32).reshape(rows, cols)
    return GridCodes(q, _nearest_f32(step, V, k).reshape(rows, -1),
                     zero.to(torch.float32).reshape(rows, -1), bits, gs)


def _nearest_f32(step: torch.Tensor, V: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Of float32(step) and its two neighbours, the scale whose ``s * k`` reproduces most float32 values."""
    s0 = step.to(torch.float32)
    cands = [s0, torch.nextafter(s0, torch.full_like(s0, float("inf"))),
             torch.nextafter(s0, torch.full_like(s0, float("-inf")))]
    V32, k32 = V.to(torch.float32), k.to(torch.float32)
    hits = torch.stack([(c[:, None] * k32 == V32).sum(dim=1) for c in cands])  # 3 x n
    best = hits.argmax(dim=0)
    return torch.stack(cands).gather(0, best[None]).squeeze(0)
