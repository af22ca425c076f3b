"""A module registered under two names (timm coat's shared CPE): fixed once, rolled back completely."""

import torch
from torch import nn

from brainsurgeon.graph import DependencyGraph


class SharedCPE(nn.Module):
    """One depthwise conv reachable as ``cpe`` and ``blocks.0.cpe``; ``strict`` refuses another width."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        cpe = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.cpe = cpe
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].cpe = cpe
        self.out = nn.Conv2d(8, 4, 1)
        self.strict = strict

    def forward(self, x):
        h = self.stem(x)
        h = h + self.cpe(h)
        h = h + self.blocks[0].cpe(h)
        if self.strict and h.shape[1] != 8:
            raise RuntimeError("this model needs 8 channels")
        return self.out(h)


def _stem_group(g):
    return next(grp for grp in g.groups() if grp.root.module == "stem")


def test_aliased_depthwise_conv_is_fixed_once():
    m = SharedCPE().eval()
    x = torch.randn(1, 3, 8, 8)
    g = DependencyGraph(m, x)
    assert g.prune([_stem_group(g).select([0, 1, 2, 3])], skip_failed=True) == []
    assert (m.cpe.groups, m.cpe.in_channels, m.cpe.out_channels) == (4, 4, 4)
    assert m(x).shape == (1, 4, 8, 8)


def test_failed_verification_restores_every_attribute_of_an_alias():
    m = SharedCPE(strict=True).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = m(x)
    g = DependencyGraph(m, x)
    failed = g.prune([_stem_group(g).select([0, 1, 2, 3])], skip_failed=True)
    assert len(failed) == 1 and "8 channels" in failed[0][1]
    assert (m.cpe.groups, m.cpe.in_channels, m.cpe.out_channels) == (8, 8, 8)
    assert m.cpe.weight.shape == (8, 1, 3, 3)
    assert torch.equal(m(x), ref)
