"""Tiny models, calibration data and a small search space shared by the search tests."""

from __future__ import annotations

import torch
from torch import nn

from brainsurgeon.search import SearchSpace


class TinyNet(nn.Module):
    """conv1 (4->8, 3x3) + BN -> flatten (128) -> fc1 (128 -> hidden) -> fc2 (hidden -> 8)."""

    def __init__(self, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(128, hidden)
        self.fc2 = nn.Linear(hidden, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.bn1.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
            self.bn1.running_var.copy_(1 + torch.rand(8, generator=g))
        self.eval()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x))).flatten(1)  # (N, 8, 4, 4) -> (N, 128)
        return self.fc2(torch.relu(self.fc1(h)))


def calib(n_batches: int = 4, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 4, 4, generator=g) for _ in range(n_batches)]


def small_space(**kw) -> SearchSpace:
    """dense, 3 unstructured levels, 2:4, 2:4+w4, block4@0.5, w4: 8 variants per layer (fast methods)."""
    d = dict(prune_method="Magnitude", levels=3, max_sparsity=0.9, nm=("2:4",), block_sparsities=(0.5,), bits=(4,),
             nm_bits=(4,), quant_method="GPTQ", model_loss_batches=2)
    d.update(kw)
    return SearchSpace(**d)


def realised(table, plan, metric: str) -> float:
    """The plan's cost as a fraction of dense, from the database entries it picks (what the solvers budget)."""
    from brainsurgeon.search import plan_entries
    entries = plan_entries(table, plan)
    return (sum(e.costs[metric] for e in entries) + table.fixed_cost(metric)) / table.dense_total(metric)
