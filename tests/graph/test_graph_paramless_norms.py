"""Norm modules without parameters (LayerNorm/RMSNorm without affine, GroupNorm/InstanceNorm without affine):
their size attributes mirror traced dims, so surgery updates them and verification passes."""

from __future__ import annotations

import copy

import pytest
import torch
from graph_fixtures import zero_slices_
from torch import nn
from torch.nn import functional as F

from brainsurgeon.graph import DependencyGraph


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_layernorm_without_affine_prunes_and_matches_functional_reference():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16, elementwise_affine=False), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    ref = copy.deepcopy(m)
    g = DependencyGraph(m, (x,))
    g.group(m[0], "out", [0, 1, 2]).prune()
    assert m[1].normalized_shape == (13,)
    assert _numel(m) == _numel(ref) - 3 * 8 - 3 - 3 * 4
    keep = torch.arange(3, 16)
    with torch.no_grad():
        h = F.layer_norm(F.linear(x, ref[0].weight[keep], ref[0].bias[keep]), (13,))
        want = F.linear(torch.relu(h), ref[3].weight[:, keep], ref[3].bias)
        assert torch.allclose(m(x), want, atol=1e-6)


def test_rmsnorm_without_weight_prunes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16, elementwise_affine=False), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    DependencyGraph(m, (x,)).group(m[0], "out", [4, 5]).prune()
    assert tuple(m[1].normalized_shape) == (14,)
    assert m(x).shape == (3, 4)


def test_groupnorm_without_affine_whole_groups_are_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    grp = DependencyGraph(m, (x,)).group(m[0], "out", [2, 3])      # group 1 of 4, whole
    zero_slices_(m, grp)
    with torch.no_grad():
        y0 = m(x)
    grp.prune()
    assert (m[1].num_groups, m[1].num_channels) == (3, 6)
    with torch.no_grad():
        assert torch.allclose(m(x), y0, atol=1e-5)


@pytest.mark.parametrize("stats", [False, True])
def test_instancenorm_without_affine_updates_num_features(stats):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, track_running_stats=stats), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    DependencyGraph(m, (x,)).group(m[0], "out", [0, 7]).prune()
    assert m[1].num_features == 6
    assert m(x).shape == (2, 4, 4, 4)


def test_groupnorm_with_affine_is_fixed_once():
    """The fixer of a module with sliced tensors wins; mirrored attributes must not shrink num_groups twice."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    DependencyGraph(m, (x,)).group(m[0], "out", list(range(8))).prune()   # groups 0 and 1, whole
    assert (m[1].num_groups, m[1].num_channels) == (2, 8)
    assert m(x).shape == (2, 4, 4, 4)


def test_a_second_commit_of_one_trace_scales_attributes_from_what_the_first_left():
    # a failed group bisected into halves commits twice without a re-trace: the second half's update must go
    # from the first half's sizes (6 channels -> 4), not from the traced 8 again
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8, affine=False), nn.ReLU(),
                      nn.Conv2d(8, 5, 1)).eval()
    g = DependencyGraph(m, torch.randn(2, 3, 8, 8))
    (key,) = {k for _, attr, keys in g.edges.attrs if attr == "num_channels" for k in keys}
    first = g.edges.attr_updates({key: 2}, g.nodes)
    second = g.edges.attr_updates({key: 4}, g.nodes, before={key: 2})
    assert first == {"1": {"num_channels": ((8,), (6,))}}
    assert second == {"1": {"num_channels": ((6,), (4,))}}
    assert g.edges.attr_updates({key: 2}, g.nodes, before={key: 2}) == {}   # nothing new: nothing to set
