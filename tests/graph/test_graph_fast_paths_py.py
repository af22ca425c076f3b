"""Fast paths of the Python steps of a prune (issue 14, speed) give exactly what the slow ones gave: the
identity-link copy of the closure (groups, partial requests, blocked reasons), a slice's rows when its
labelling is the identity, the HF width scan that skips leaves, the undo snapshot of plain attributes."""

import copy

import numpy as np
import pytest
import torch
from graph_fixtures import FIXTURES, build

from brainsurgeon.graph import DependencyGraph, hf, maps, surgery
from brainsurgeon.graph.commit import _labelled_counts
from brainsurgeon.graph.graph import _slice_idxs


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


def test_slice_idxs_identity_fast_path_matches_the_general_one():
    rng = np.random.default_rng(0)
    cases = [np.arange(6), np.array([0, 1, 2]), np.array([2, 0, 1]), np.array([0, -1, 1, -1]),
             np.array([1, 0, 1, 0]), np.array([0, 0, 1]), rng.permutation(8), np.arange(4)]
    for lab in cases:
        n = int(lab.max()) + 1
        fast, slow = _slice_idxs(lab, n, np.arange(n)), _slice_idxs(lab, n)
        assert (fast is None) == (slow is None)
        if fast is not None:
            assert fast.dtype == slow.dtype and fast.tolist() == slow.tolist()
    assert _slice_idxs(np.arange(5), 5, np.arange(5)).tolist() == [[0], [1], [2], [3], [4]]


def test_layer_widths_skipping_leaves_matches_the_full_scan(monkeypatch):
    pytest.importorskip("transformers")
    from graph_fixtures import tiny_bert, tiny_llama_gqa
    for make in (tiny_bert, tiny_llama_gqa):
        torch.manual_seed(0)
        model = make()
        fast = hf.layer_widths(model)
        monkeypatch.setattr(hf, "_is_leaf", lambda m: False)
        assert hf.layer_widths(model) == fast and fast
        monkeypatch.undo()


def test_module_attrs_copies_exactly_what_copy_copy_copies():
    m = torch.nn.Conv2d(4, 4, 3, padding=(1, 1))
    m.extra_list = [1, 2]
    m.extra_dict = {"a": [3]}
    snap = surgery.module_attrs(m)
    ref = {k: copy.copy(v) for k, v in vars(m).items()
           if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.nn.Module))}
    assert snap == ref and list(snap) == list(ref)
    assert all((snap[k] is v) == (ref[k] is v) for k, v in vars(m).items() if k in snap)   # copies stay copies


def test_labelled_counts_match_one_sum_per_array():
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = [rng.integers(-1, 3, size=int(rng.integers(0, 6))) for _ in range(int(rng.integers(1, 8)))]
        assert _labelled_counts(labels) == [int((lab >= 0).sum()) for lab in labels]
