"""Fast paths of the Python steps of a prune (issue 14, speed) give exactly what the slow ones gave: the
identity-link copy of the closure (groups, partial requests, blocked reasons), ..."""

import numpy as np
import pytest
import torch
from graph_fixtures import FIXTURES, build

from brainsurgeon.graph import DependencyGraph, maps


def _slow_copy(self, src, dst, size, on, lon, ver):
    return self.apply(dst, size, on, lon)


def _closures(g: DependencyGraph) -> list:
    """Every full-width closure of the graph's parameter dims plus a partial (every other channel) one."""
    out = []
    for _, ids in sorted(g._param_nodes.items()):
        for d, size in enumerate(g.nodes[ids[0]].shape):
            if size < 2:
                continue
            for req in (np.arange(size), np.arange(0, size, 2)):
                for stop in (True, False):
                    cl = maps.closure(g.edges, (ids[0], d), req, np.arange(len(req)), stop_when_blocked=stop)
                    out.append((cl.n, [(k, v.tolist()) for k, v in cl.labels.items()], cl.blocked, cl.inexact))
    return out


def _groups(g: DependencyGraph) -> list:
    return [(grp.n, grp.exact, [(s.module, s.tensor, s.dim, s.idxs.tolist(), s.role) for s in grp.slices],
             [(k, v.tolist()) for k, v in grp.labels.items()]) for grp in g.groups()] + [g.left_out]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_closure_identity_copy_matches_apply(name, monkeypatch):
    if name.startswith("Tiny"):
        pytest.importorskip("transformers")
    model, x = build(name)
    g = DependencyGraph(model, x)
    fast = (_closures(g), _groups(g))
    monkeypatch.setattr(maps._Labels, "copy", _slow_copy)
    assert (_closures(g), _groups(g)) == fast


def test_identity_copy_after_the_source_changed_falls_back():
    """A source written after its labelled positions were read: the copy applies those positions (as
    ``apply`` would), not the source's current array."""
    lab = maps._Labels(4)
    lab.apply((0, 0), 4, np.array([0, 1]), np.array([0, 1]))
    on = np.array([0, 1])
    lon = np.array([0, 1])
    lab.apply((0, 0), 4, np.array([2]), np.array([2]))   # version 1 now
    assert lab.copy((0, 0), (1, 0), 4, on, lon, 0)
    assert lab.lab[(1, 0)].tolist() == [0, 1, -1, -1]
    assert lab.copy((0, 0), (2, 0), 4, np.array([0, 1, 2]), np.array([0, 1, 2]), 1)
    assert lab.lab[(2, 0)].tolist() == [0, 1, 2, -1]
    assert not lab.copy((2, 0), (0, 0), 4, np.array([0, 1, 2]), np.array([0, 1, 2]), 0)   # the way back
    assert torch.equal(torch.as_tensor(lab.lab[(0, 0)]), torch.tensor([0, 1, 2, -1]))
