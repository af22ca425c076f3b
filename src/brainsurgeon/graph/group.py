"""Slices and groups: the inspectable plan of a structural pruning step (the contract with ``prune/``).

A :class:`Group` lists every parameter/buffer slice coupled to a set of logical channels. Row ``r`` of
each slice's ``idxs`` holds the indices of that tensor removed together with logical channel ``r``::

    >>> grp = g.group("conv1", dim="out", idxs=[0, 2])
    >>> print(grp)
    Group n=2 (root conv1.weight dim 0), exact
      conv1.weight      dim 0  2x1  out
      conv1.bias        dim 0  2x1  out
      bn1.weight        dim 0  2x1  param
      conv2.weight      dim 1  2x1  in
    >>> grp.prune()     # physically removes the 2 channels, verified; SurgeryError + restore on failure

Rows are already whole units (conv groups, attention heads, GQA groups), so ``unit`` is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .maps import Key


class GraphLike(Protocol):
    """What a group needs from its graph (:class:`~brainsurgeon.graph.DependencyGraph`): the model and
    ``prune``. A protocol, so that this module does not import ``graph.py`` (which imports it)."""

    model: nn.Module

    def prune(self, groups: Any, *, skip_failed: bool = False) -> Any: ...


@dataclass(frozen=True)
class Slice:
    """One coupled parameter/buffer slice: ``idxs[r]`` are the indices along ``dim`` of logical channel r."""

    module: str
    tensor: str
    dim: int
    idxs: torch.Tensor  # int64 [n, k]
    role: str           # 'out' | 'in' | 'param'

    @property
    def name(self) -> str:
        """``module.tensor`` as in ``state_dict`` keys."""
        return f"{self.module}.{self.tensor}" if self.module else self.tensor

    def __repr__(self) -> str:
        return f"Slice({self.name}, dim={self.dim}, idxs={tuple(self.idxs.shape)}, role={self.role!r})"


@dataclass(eq=False)
class Group:
    """Every slice coupled to ``n`` logical channels; ``select`` narrows it, ``prune`` applies it.

    ``slices[0]`` is the ``root`` (the slice the request was made on).

    ``exact`` is False when removing the channels changes outputs even if they were zeroed first
    (statistics over the pruned dim: LayerNorm/RMSNorm hidden width, means, default attention scale);
    ``inexact_by`` names those ops.
    """

    slices: tuple[Slice, ...]
    n: int
    root: Slice
    graph: GraphLike | None = field(default=None, repr=False)
    exact: bool = True
    inexact_by: tuple[str, ...] = ()
    unit: int = 1
    labels: dict[Key, np.ndarray] = field(default_factory=dict, repr=False)  # activation keys -> row or -1
    version: int = 0

    def select(self, rows: torch.Tensor | np.ndarray | list[int]) -> Group:
        """The same group restricted to logical channels ``rows`` (in that order).

        >>> half = grp.select(torch.arange(grp.n // 2))
        """
        r = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if len(r) and (int(r.min()) < 0 or int(r.max()) >= self.n):
            from ..errors import ConfigError
            raise ConfigError(f"Group.select: rows must lie in [0, {self.n}) for this group of "
                              f"{self.root.name}; got min {int(r.min())}, max {int(r.max())}")
        if len(r) and int(torch.bincount(r, minlength=self.n).max()) > 1:   # (rows lie in [0, n): checked above)
            from ..errors import ConfigError
            raise ConfigError(f"Group.select: rows must be distinct; got {r.tolist()}")
        remap = np.full(self.n + 1, -1, dtype=np.int64)
        remap[r.numpy()] = np.arange(len(r))
        labels = {k: remap[v] for k, v in self.labels.items()}   # -1 maps to remap[-1] = -1
        slices = tuple(Slice(s.module, s.tensor, s.dim, s.idxs[r], s.role) for s in self.slices)
        return Group(slices, len(r), slices[0], self.graph, self.exact, self.inexact_by, self.unit, labels,
                     self.version)

    def prune(self) -> None:
        """Physically remove all ``n`` channels from every slice, then verify (see ``DependencyGraph.prune``)."""
        if self.graph is None:
            from ..errors import SurgeryError
            raise SurgeryError("this Group is not attached to a DependencyGraph; build it with g.group(...)")
        self.graph.prune([self])

    def numel(self) -> int:
        """Number of parameter/buffer elements this group removes (a tensor sliced on two dims counts once)."""
        per_tensor: dict[int, tuple[torch.Tensor, dict[int, int]]] = {}
        for s in self.slices:
            t = self._tensor(s)
            per_tensor.setdefault(id(t), (t, {}))[1][s.dim] = int(s.idxs.numel())
        total = 0
        for t, dims in per_tensor.values():
            kept = [n - dims.get(d, 0) for d, n in enumerate(t.shape)]
            total += t.numel() - int(np.prod(kept))
        return total

    def _tensor(self, s: Slice) -> torch.Tensor:
        if self.graph is None:
            raise RuntimeError("Group is not attached to a DependencyGraph")
        return getattr(self.graph.model.get_submodule(s.module), s.tensor)

    def __repr__(self) -> str:
        head = f"Group n={self.n} (root {self.root.name} dim {self.root.dim}), " + \
            ("exact" if self.exact else f"inexact: {', '.join(self.inexact_by)}")
        width = max([len(s.name) for s in self.slices] + [10])
        lines = [head] + [f"  {s.name:<{width}}  dim {s.dim}  {s.idxs.shape[0]}x{s.idxs.shape[1]}  {s.role}"
                          for s in self.slices]
        return "\n".join(lines)

    __str__ = __repr__
