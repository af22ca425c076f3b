"""Fast paths of the Python steps of a prune (issue 14, speed) give exactly what the slow ones gave: the
identity-link copy of the closure (groups, partial requests, blocked reasons), ..."""

import numpy as np
import pytest
import torch
from graph_fixtures import FIXTURES, build

from brainsurgeon.graph import DependencyGraph, maps


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
    monkeypatch.setattr(maps, "_FAST_IDENTITY", False)
    assert (_closures(g), _groups(g)) == fast


def _edges_with_self_gather() -> maps.Edges:
    """a --id-- b --id-- c, a self-map on b (b[i] ~ b[3 - i]) and a split of c into atoms (2, 2)."""
    e = maps.Edges()
    for k in ((0, 0), (1, 0), (2, 0)):
        e._add(k, 4)
    e.link((0, 0), (1, 0))
    e.gather((1, 0), (1, 0), np.array([3, 2, 1, 0]))
    e.link((1, 0), (2, 0))
    e.split((2, 0), [(e.atom(2), 2), (e.atom(2), 2)])
    return e


@pytest.mark.parametrize("req", [[0, 1, 2, 3], [0], [1, 2], [3, 0]])
def test_identity_fast_path_with_a_key_written_while_it_is_processed(req, monkeypatch):
    """A key that gains positions through its own self-map while it is processed: its identity links
    carry what it had when it was taken from the worklist, as the per-link reference does."""
    def run():
        cl = maps.closure(_edges_with_self_gather(), (0, 0), np.array(req), np.arange(len(req)))
        return cl.n, [(k, v.tolist()) for k, v in cl.labels.items()], cl.blocked, cl.inexact
    fast = run()
    monkeypatch.setattr(maps, "_FAST_IDENTITY", False)
    assert run() == fast
    assert torch.equal(torch.as_tensor(dict(fast[1])[(2, 0)]) >= 0, torch.as_tensor(dict(fast[1])[(1, 0)]) >= 0)
