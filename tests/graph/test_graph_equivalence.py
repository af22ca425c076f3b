"""Zero the slices a group names, then prune them: outputs are unchanged — for every group of every fixture.

Groups flagged inexact (statistics over the pruned dim, e.g. LayerNorm/RMSNorm hidden width) must still
prune to a smaller model that runs; the flag itself is checked on the transformer fixtures.
"""

from __future__ import annotations

import copy

import pytest
import torch
from graph_fixtures import FIXTURES, build, zero_slices_

from brainsurgeon.graph import DependencyGraph
from brainsurgeon.graph.trace import run_model

# groups expected from groups() on each fixture: (#groups, root names of the exact ones)
EXPECTED_GROUPS = {
    "ResidualAdd": 2, "ConcatSplit": 3, "GroupConv": 1, "DepthwiseConv": 1, "FlattenLinear": 3, "MHA": 2,
    "LSTM": 2, "GRU": 1, "TiedEmbedding": 2, "GAT": 1, "ConvTranspose": 2, "TinyBERT": 4, "TinyLlamaGQA": 5,
}
HF = {"TinyBERT", "TinyLlamaGQA"}


def _numel(m: torch.nn.Module) -> int:
    """Elements of the distinct parameters and buffers (a tied weight counts once)."""
    return sum(t.numel() for t in {id(t): t for t in [*m.parameters(), *m.buffers()]}.values())


def _main_output(y: object) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, tuple):
        return y[0]
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


@pytest.mark.parametrize("name", list(FIXTURES))
def test_zeroed_group_prunes_without_changing_outputs(name):
    if name in HF:
        pytest.importorskip("transformers")
    model, x = build(name)
    n_groups = len(DependencyGraph(model, x).groups())
    assert n_groups == EXPECTED_GROUPS[name]
    for i in range(n_groups):
        m = copy.deepcopy(model)
        g = DependencyGraph(m, x)
        grp = g.groups()[i]
        sel = grp.select(torch.arange(0, grp.n, 2))          # every other logical channel
        params_before = _numel(m)
        removed = sel.numel()
        zero_slices_(m, sel)
        with torch.no_grad():
            y0 = _main_output(run_model(m, x))
        sel.prune()
        with torch.no_grad():
            y1 = _main_output(run_model(m, x))
        assert y1.shape == y0.shape
        assert _numel(m) == params_before - removed, grp.root.name
        if sel.exact:
            torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5, msg=f"{name}: {grp.root.name}")
        for s in sel.slices:
            t = getattr(m.get_submodule(s.module), s.tensor)
            assert t.shape[s.dim] == getattr(model.get_submodule(s.module), s.tensor).shape[s.dim] - s.idxs.numel()


def test_group_structure_of_edge_cases():
    m, x = build("DepthwiseConv")
    (grp,) = DependencyGraph(m, x).groups()
    dw = next(s for s in grp.slices if s.name == "dw.weight" and s.dim == 0)
    assert dw.idxs[:2].tolist() == [[0, 1], [2, 3]]                    # channel c -> depthwise outputs 2c, 2c+1
    m, x = build("GroupConv")
    (grp,) = DependencyGraph(m, x).groups()
    assert grp.n == 4 and grp.root.idxs[1].tolist() == [4, 5, 6, 7]   # whole conv groups of 4 input channels
    grp.select([1, 3]).prune()
    assert (m.g.groups, m.g.in_channels, m.g.out_channels) == (2, 8, 12)
    m, x = build("LSTM")
    g = DependencyGraph(m, x)
    grp = g.group(m.lstm, "out", [3])
    rows = {s.name: s.idxs.tolist() for s in grp.slices if s.dim == 0}
    assert rows["lstm.weight_ih_l0"] == [[3, 11, 19, 27]]             # the 4 gates of hidden unit 3
    assert {s.name for s in grp.slices} >= {"lstm.weight_ih_l1", "lstm.weight_hh_l0", "lstm.bias_hh_l0"}


def test_transformer_heads_and_inexact_flags():
    pytest.importorskip("transformers")
    m, x = build("TinyLlamaGQA")
    g = DependencyGraph(m, x)
    grp = g.group("model.layers.0.self_attn.k_proj", "out", range(4))   # kv head 0 of 2
    sizes = {s.name: tuple(s.idxs.shape) for s in grp.slices}
    assert sizes["model.layers.0.self_attn.q_proj.weight"] == (1, 8)    # its 2 query heads x head_dim 4
    assert sizes["model.layers.0.self_attn.o_proj.weight"] == (1, 8)
    assert grp.exact
    hidden = g.group("model.embed_tokens", "out", [0])
    assert not hidden.exact and any("rms" in r.lower() or "mean" in r for r in hidden.inexact_by)
    m, x = build("TinyBERT")
    g = DependencyGraph(m, x)
    grp = g.group("encoder.layer.0.attention.self.query", "out", range(4, 8))   # head 1
    grp.prune()
    att = m.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size) == (3, 12)
