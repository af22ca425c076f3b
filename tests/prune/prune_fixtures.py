"""Small named fixtures for the pruning tests: a conv -> BN -> conv model and hand-built groups.

The hand-built groups follow the Group contract of ``brainsurgeon.graph`` (slices with module,
tensor, dim, idxs [n, k], role; n; root; select) so the criteria can be tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Slice:
    module: str
    tensor: str
    dim: int
    idxs: torch.Tensor
    role: str


@dataclass(frozen=True)
class HandGroup:
    slices: tuple[Slice, ...]
    unit: int = 1

    @property
    def n(self) -> int:
        return int(self.slices[0].idxs.shape[0])

    @property
    def root(self) -> Slice:
        return self.slices[0]

    def select(self, rows: torch.Tensor) -> HandGroup:
        return HandGroup(tuple(Slice(s.module, s.tensor, s.dim, s.idxs[rows], s.role) for s in self.slices),
                         self.unit)


class ConvBNConv(nn.Module):
    """(N, 3, 8, 8) -> conv1 (8 ch) -> bn1 -> relu -> conv2 (6 ch) -> bn2 -> relu -> pool -> fc (4 classes)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 4)
            for bn in (self.bn1, self.bn2):  # non-trivial affine and statistics
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.1, 0.1)
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (N, 8, 8, 8)
        h = F.relu(self.bn2(self.conv2(h)))  # (N, 6, 8, 8)
        return self.fc(h.mean((2, 3)))  # (N, 6) -> (N, 4)


def _col(n: int) -> torch.Tensor:
    return torch.arange(n).unsqueeze(1)  # (n, 1)


def conv1_group() -> HandGroup:
    """conv1's 8 output channels and everything coupled to them."""
    return HandGroup((
        Slice("conv1", "weight", 0, _col(8), "out"), Slice("conv1", "bias", 0, _col(8), "out"),
        Slice("bn1", "weight", 0, _col(8), "param"), Slice("bn1", "bias", 0, _col(8), "param"),
        Slice("bn1", "running_mean", 0, _col(8), "param"), Slice("bn1", "running_var", 0, _col(8), "param"),
        Slice("conv2", "weight", 1, _col(8), "in"),
    ))


def conv2_group() -> HandGroup:
    """conv2's 6 output channels and everything coupled to them."""
    return HandGroup((
        Slice("conv2", "weight", 0, _col(6), "out"),
        Slice("bn2", "weight", 0, _col(6), "param"), Slice("bn2", "bias", 0, _col(6), "param"),
        Slice("bn2", "running_mean", 0, _col(6), "param"), Slice("bn2", "running_var", 0, _col(6), "param"),
        Slice("fc", "weight", 1, _col(6), "in"),
    ))


def zero_channel_(model: nn.Module, group: HandGroup, c: int) -> None:
    """Zero every slice of logical channel c (running_var set to 1)."""
    with torch.no_grad():
        for s in group.slices:
            t = getattr(model.get_submodule(s.module), s.tensor)
            t.index_fill_(s.dim, s.idxs[c], 1.0 if s.tensor == "running_var" else 0.0)


def calib_batches(n: int = 4, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (input, label) pairs for ConvBNConv."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """(n, cols) inputs with strongly correlated columns (a random mixing of a few factors)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols // 2, generator=g, dtype=torch.float64)
    mix = torch.randn(cols // 2, cols, generator=g, dtype=torch.float64)
    return z @ mix + 0.1 * torch.randn(n, cols, generator=g, dtype=torch.float64)


class TinyMHA(nn.Module):
    """(N, T, 8) -> inp (16) -> 4-head self-attention + residual -> fc (16) -> out (3)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = nn.Linear(8, 16)
            self.att = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 16)
            self.out = nn.Linear(16, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (N, T, 16)
        a, _ = self.att(h, h, h)
        return self.out(torch.relu(self.fc(a + h)))  # (N, T, 3)
