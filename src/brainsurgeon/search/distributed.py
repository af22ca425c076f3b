"""Scale-out: data-parallel Hessians with ``torch.distributed`` and one owner rank per layer.

Each rank accumulates ``H_r = 2/n_r X_r X_r^T`` on its shard of the calibration data; the
all-reduce of ``n_r * H_r`` and ``n_r`` gives every rank ``H = 2/n X X^T`` over all the data,
the same Hessian one process computes on everything (works with any backend; gloo on CPU).
Layers are then solved by one owner rank each, balanced by their solve cost (~cols^2 per row
for OBS) with longest-processing-time-first bin packing.

    >>> with capture_hessians(model, names) as accs:
    ...     for x in my_shard: model(x)
    >>> H = all_reduce_hessians(accs)              # {name: global H}, identical on every rank
    >>> owners = assign_owners({n: H[n].shape[-1] for n in H}, dist.get_world_size())
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..calib import HessianAccumulator


def all_reduce_hessian(H: torch.Tensor, n: int, group: Any = None) -> tuple[torch.Tensor, int]:
    """(global H, global n) from this rank's (H_r, n_r); a rank with n_r = 0 may pass zeros.

    >>> H, n = all_reduce_hessian(acc.H, acc.n)
    """
    total = (H.to(torch.float64) * float(n)).contiguous()  # sum_i 2 x_i x_i^T on this rank
    count = torch.tensor([float(n)], dtype=torch.float64, device=H.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    n_all = int(count.item())
    return (total / max(n_all, 1)).to(H.dtype), n_all


def all_reduce_hessians(accs: dict[str, HessianAccumulator], group: Any = None) -> dict[str, torch.Tensor]:
    """Global Hessian of every accumulator, in the same (sorted) order on every rank."""
    out = {}
    for name in sorted(accs):
        acc = accs[name]
        if acc.n:
            H_r = acc.H
        else:  # this rank saw no data for the layer: contribute zeros of the right shape
            shape = (acc.cols, acc.cols) if acc.groups == 1 else (acc.groups, acc.cols, acc.cols)
            H_r = torch.zeros(shape, dtype=acc.dtype, device=acc.module.weight.device)
        out[name] = all_reduce_hessian(H_r, acc.n, group)[0]
    return out


def assign_owners(cols: dict[str, int], world_size: int) -> dict[str, int]:
    """Owner rank per layer: largest cols^2 first, each to the least-loaded rank (deterministic).

    >>> assign_owners({"a": 512, "b": 64, "c": 500}, 2)
    {'a': 0, 'c': 1, 'b': 1}
    """
    load = [0] * world_size
    owners = {}
    for name in sorted(cols, key=lambda n: (-cols[n] ** 2, n)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += cols[name] ** 2
    return owners
