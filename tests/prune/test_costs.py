"""Measured costs: exact MACs per module, innermost attribution sums to the total."""

import torch
from torch import nn

from brainsurgeon.prune import measure


def test_exact_macs_and_params():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    c = measure(m, torch.zeros(2, 3, 8, 8))
    assert c.macs == {"0": 2 * 8 * 3 * 9 * 64, "3": 2 * 512 * 10}
    assert c.params == {"0": 8 * 3 * 9 + 8, "3": 512 * 10 + 10}
    assert c.total_macs == sum(c.macs.values()) and c.total_params == sum(c.params.values())


def test_nested_modules_are_attributed_to_the_innermost_and_mode_is_kept():
    inner = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    m = nn.Sequential(inner, nn.Linear(2, 3)).train()
    c = measure(m, torch.zeros(5, 4))
    assert c.macs == {"0.0": 5 * 4 * 6, "0.1": 5 * 6 * 2, "1": 5 * 2 * 3}
    assert m.training
