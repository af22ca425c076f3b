"""Which channels to remove, given scores: per-group (local) or one global ranking. Pure functions.

Counts are exact and documented: a group of width ``n`` pruned at ratio ``r`` keeps
``keep = n - floor(r * n)`` channels, rounded *up* to a multiple of ``round_to`` (never above
``n``), so rounding never removes more than asked. With units (``unit = u > 1``: heads, conv
channel-groups) ``"whole"`` removes whole units (``floor(r * n / u)`` of them) and ``"dims"``
removes the same within-unit positions from every unit (``floor(r * u)`` per unit).

    >>> keep_count(30, 0.5, round_to=8)
    16
    >>> select_local(torch.tensor([3., 1., 2., 0.]), 0.5)
    tensor([1, 3])
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-9


def keep_count(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept of `n` at `ratio`: ``n - floor(ratio * n)`` rounded up to a multiple of `round_to`.

    >>> keep_count(32, 0.3), keep_count(32, 0.3, round_to=8)
    (23, 24)
    """
    keep = n - math.floor(ratio * n + _EPS)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return max(1, min(n, keep))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores, ascending by index (ties broken by lower index first)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores.cpu().double(), stable=True).indices
    return order[:k].sort().values


def unit_rows(n: int, unit: int, units: torch.Tensor) -> torch.Tensor:
    """Logical channel rows of whole units: unit j covers rows [j * unit, (j + 1) * unit)."""
    return (units.unsqueeze(1) * unit + torch.arange(unit)).reshape(-1)  # (len(units) * unit,)


def select_local(scores: torch.Tensor, ratio: float, round_to: int = 1, unit: int = 1,
                 heads: str = "whole", n_orig: int | None = None) -> torch.Tensor:
    """Rows (sorted) to remove from one group so that ``keep_count(n_orig, ratio)`` remain.

    `n_orig` is the group's width before any pruning step (iterative pruning); defaults to n.

    >>> select_local(torch.arange(8.), 0.5, unit=2)       # the two weakest pairs
    tensor([0, 1, 2, 3])
    """
    n = scores.shape[0]
    n_orig = n if n_orig is None else n_orig
    if unit <= 1:
        return _lowest(scores, n - min(n, keep_count(n_orig, ratio, round_to)))
    if n % unit:
        raise ValueError(f"a group of {n} channels cannot be split into units of {unit}")
    per_unit = scores.reshape(n // unit, unit)  # (units, unit)
    if heads == "whole":
        want = keep_count(n_orig // unit, ratio)
        units = _lowest(per_unit.sum(1), n // unit - min(n // unit, want))
        return unit_rows(n, unit, units)
    pos = _lowest(per_unit.sum(0), unit - min(unit, keep_count(n_orig // (n // unit), ratio, round_to)))
    return (torch.arange(n // unit).unsqueeze(1) * unit + pos).reshape(-1).sort().values


def select_global(scores: list[torch.Tensor], ratio: float, max_layer_ratio: float,
                  n_orig: list[int] | None = None, round_to: int = 1, units: list[int] | None = None,
                  ) -> list[torch.Tensor]:
    """One ranking over every group: remove ``floor(ratio * sum n_orig)`` channels, lowest scores first,
    no group ending below ``keep_count(n_orig, max_layer_ratio)``; then round each group's kept
    count up to `round_to`. Groups with units rank whole units (score = sum over the unit).

    >>> select_global([torch.tensor([0., 1., 5., 6.]), torch.tensor([2., 3.])], 0.5, 0.5)
    [tensor([0, 1]), tensor([0])]
    """
    n_cur = [s.shape[0] for s in scores]
    n_orig = n_cur if n_orig is None else n_orig
    units = [1] * len(scores) if units is None else units
    floor_keep = [keep_count(no, max_layer_ratio) for no in n_orig]
    budget = math.floor(ratio * sum(n_orig) + _EPS) - sum(no - nc for no, nc in zip(n_orig, n_cur, strict=True))
    items = []  # (score, group, item index, width in channels)
    for gi, (s, u) in enumerate(zip(scores, units, strict=True)):
        vals = s.double().cpu() if u <= 1 else s.double().cpu().reshape(-1, u).sum(1)
        items += [(float(v), gi, j, max(u, 1)) for j, v in enumerate(vals)]
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    chosen: list[list[int]] = [[] for _ in scores]
    left = list(n_cur)
    for _, gi, j, w in items:
        if budget < w:
            continue
        if left[gi] - w < floor_keep[gi]:
            continue
        chosen[gi].append(j)
        left[gi] -= w
        budget -= w
    out = []
    for gi, s in enumerate(scores):
        u = units[gi]
        if u > 1:
            out.append(unit_rows(n_cur[gi], u, torch.tensor(sorted(chosen[gi]), dtype=torch.long)))
            continue
        keep = len(s) - len(chosen[gi])
        if round_to > 1:
            keep = min(len(s), math.ceil(keep / round_to) * round_to)
        out.append(_lowest(s, len(s) - keep))
    return out
