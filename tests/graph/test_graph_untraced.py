"""A branch the example inputs never reach blocks the groups it may touch, and is named (issue 13 #3)."""

import pytest
import torch
from torch import nn

from brainsurgeon.errors import UnsupportedOpError
from brainsurgeon.graph import DependencyGraph
from brainsurgeon.prune import ChannelPruning, prune_


class DataBranch(nn.Module):
    """``a`` or ``b`` depending on the sign of the input's mean; ``c`` (other width) is always used."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 12, 1)
        self.d = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        h = self.a(h) if x.mean() > 0 else self.b(h)
        return self.d(torch.relu(self.c(h)))


def _pos():
    return torch.rand(1, 3, 8, 8) + 0.1


def test_untraced_module_blocks_the_groups_of_its_width_and_is_reported():
    m = DataBranch().eval()
    g = DependencyGraph(m, _pos())
    assert g.untraced == {"b": {8}}
    roots = {grp.root.module for grp in g.groups()}
    assert roots == {"c"}                       # stem and a (8 wide) are blocked, c (12 wide) is free
    assert "untraced module 'b'" in g.report() and "never reached" in g.report()
    with pytest.raises(UnsupportedOpError, match="untraced module 'b'.*pass inputs that run it"):
        g.group("stem", "out", [0, 1])


def test_prune_never_returns_a_model_whose_other_branch_is_broken():
    torch.manual_seed(0)
    m = DataBranch().eval()
    rep = prune_(m, ChannelPruning(ratio=0.5), example_inputs=_pos())
    assert m.c.out_channels == 6
    assert any("never reached" in n and "b" in n for n in rep.notes)
    assert m(-_pos()).shape == (1, 4, 8, 8)     # the other branch still runs
