"""Indexing ops the dependency graph follows (issue 14 #6): gather, scatter/index_add, ``.item()``.

``torch.gather(x, d, idx)`` couples every dim of ``idx`` and the output as identities and the other dims
of ``x`` as identities (or prefixes); ``x``'s dim ``d`` is read at data-dependent positions and blocks,
with a note naming the op. DeBERTa-v2's relative attention gathers its c2p/p2c scores that way: its heads
are now prunable (they were blocked by ``aten.gather (no rule)``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from graph_fixtures import reload_hf, zero_slices_
from torch import nn

from brainsurgeon.errors import UnsupportedOpError
from brainsurgeon.graph import DependencyGraph


class GatherChannels(nn.Module):
    """Channels pass a gather along time: y[b, c, t] = h[b, c, idx[t]]; the time positions are fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 8, 1)
        self.b = nn.Conv1d(8, 4, 1)
        self.register_buffer("idx", torch.tensor([[[4, 0, 2]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))                                            # (B, 8, 5)
        return self.b(torch.gather(h, 2, self.idx.expand(x.shape[0], h.shape[1], -1)))  # (B, 4, 3)


class GatherFeatures(nn.Module):
    """The gathered dim is a Linear's output features: those features cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(3, 2)
        self.register_buffer("idx", torch.tensor([[[5, 1, 3]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)                                                    # (B, C, 6)
        return self.b(torch.gather(h, 2, self.idx.expand(x.shape[0], x.shape[1], -1)))


class ScatterMessages(nn.Module):
    """GNN-style aggregation: messages of each edge are added into their destination node (index_add, scatter_add)."""

    def __init__(self) -> None:
        super().__init__()
        self.msg = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.register_buffer("dst", torch.tensor([0, 2, 2, 1, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # x: (edges 5, 4)
        m = F.relu(self.msg(x))                                  # (5, 6)
        agg = torch.zeros(3, m.shape[1]).index_add(0, self.dst, m)
        agg2 = torch.zeros(3, m.shape[1]).scatter_add(0, self.dst[:, None].expand(-1, m.shape[1]), m)
        return self.out(agg + agg2 * float(agg2.sum().item() != 0))


def test_gather_keeps_the_coupled_channels_exactly():
    torch.manual_seed(0)
    m = GatherChannels().eval()
    x = torch.randn(2, 3, 5)
    ref = copy.deepcopy(m)
    g = DependencyGraph(m, (x,))
    grp = g.group(m.a, "out", [1, 6])
    assert {(s.name, s.dim): s.idxs.reshape(-1).tolist() for s in grp.slices} == {
        ("a.weight", 0): [1, 6], ("a.bias", 0): [1, 6], ("b.weight", 1): [1, 6]}
    zero_slices_(ref, grp)
    with torch.no_grad():
        y0 = ref(x)
    grp.prune()
    keep = [0, 2, 3, 4, 5, 7]
    assert m.a.out_channels == m.b.in_channels == 6
    assert torch.equal(m.b.weight, ref.b.weight[:, keep]) and torch.equal(m.a.weight, ref.a.weight[keep])
    with torch.no_grad():
        torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-6)
    assert "aten.gather" not in g.report().split("blocked dims")[0]   # not listed as an op without a rule


def test_gathered_dim_is_refused_with_the_op_named():
    m = GatherFeatures().eval()
    g = DependencyGraph(m, (torch.randn(2, 4, 5),))
    with pytest.raises(UnsupportedOpError, match=r"aten.gather\(dim=2\) \(positions chosen by the values of an "
                                                 r"index tensor: this dim cannot shrink"):
        g.group(m.a, "out", [0])
    assert "aten.gather(dim=2)" in g.report()
    assert not [grp for grp in g.groups() if grp.root.name == "a.weight"]


def test_scatter_and_index_add_keep_features_prunable():
    torch.manual_seed(0)
    m = ScatterMessages().eval()
    x = torch.randn(5, 4)
    ref = copy.deepcopy(m)
    g = DependencyGraph(m, (x,))
    assert not g.unsupported, g.report()                      # index_add, scatter_add, item all have rules
    grp = g.group(m.msg, "out", [0, 3])
    assert {(s.name, s.dim) for s in grp.slices} == {("msg.weight", 0), ("msg.bias", 0), ("out.weight", 1)}
    zero_slices_(ref, grp)
    with torch.no_grad():
        y0 = ref(x)
    grp.prune()
    assert m.msg.out_features == m.out.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-6)


REL = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 256,
       "max_relative_positions": -1, "norm_rel_ebd": "layer_norm", "share_att_key": True,
       "position_biased_input": False}   # the deberta-v3 config shape


@pytest.mark.parametrize("share_att_key", [True, False])
def test_deberta_v2_relative_attention_prunes_whole_heads(tmp_path, share_att_key):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64, num_labels=3,
                                       **{**REL, "share_att_key": share_att_key})
    cfg._attn_implementation = "eager"
    m = transformers.DebertaV2ForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))}
    n0 = sum(p.numel() for p in m.parameters())
    g = DependencyGraph(m, x)
    assert "aten.gather" not in g.unsupported
    heads = [grp for grp in g.groups() if grp.root.name.endswith("attention.self.query_proj.weight")]
    assert [grp.n for grp in heads] == [4, 4] and all(grp.exact for grp in heads)   # whole heads, q/k/v/o coupled
    import brainsurgeon as bs

    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("classifier",)), example_inputs=x)
    assert not any("failed verification" in n for n in rep.notes)
    assert sum(p.numel() for p in m.parameters()) < 0.4 * n0
    for layer in m.deberta.encoder.layer:
        att = layer.attention.self
        assert (att.num_attention_heads, att.attention_head_size, att.query_proj.out_features) == (2, 16, 32)
    with torch.no_grad():
        ref = m(**x).logits
        m.train()
        assert m(**x).logits.shape == ref.shape
        m.eval()
    with torch.no_grad():
        assert torch.equal(reload_hf(m, tmp_path)(**x).logits, ref)


class MaskedFill(nn.Module):
    """SpecAugment-style ``h[mask] = embed``: a boolean mask over (batch, time) writes a learned vector."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)
        self.embed = nn.Parameter(torch.randn(6))
        self.register_buffer("mask", torch.tensor([[True, False, True]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # x: (1, 3, 4)
        h = self.a(x).clone()
        h[self.mask] = self.embed
        return self.b(h)


class IndexedWrite(nn.Module):
    """``h[:, [0, 2]] = 0`` writes fixed channels: that dim cannot shrink (the positions would move)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 6, 1)
        self.b = nn.Conv1d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).clone()
        h[:, torch.tensor([0, 2])] = 0.0
        return self.b(h)


def test_boolean_mask_write_keeps_the_written_vector_coupled():
    torch.manual_seed(0)
    m = MaskedFill().eval()
    x = torch.randn(1, 3, 4)
    ref = copy.deepcopy(m)
    g = DependencyGraph(m, (x,))
    grp = g.group(m.a, "out", [1, 4])
    assert {(s.name, s.dim): s.idxs.reshape(-1).tolist() for s in grp.slices} == {
        ("a.weight", 0): [1, 4], ("a.bias", 0): [1, 4], ("embed", 0): [1, 4], ("b.weight", 1): [1, 4]}
    zero_slices_(ref, grp)
    with torch.no_grad():
        y0 = ref(x)
    grp.prune()
    assert m.embed.shape == (4,) and m.b.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-6)


def test_integer_indexed_write_blocks_that_dim():
    m = IndexedWrite().eval()
    g = DependencyGraph(m, (torch.randn(1, 3, 5),))
    with pytest.raises(UnsupportedOpError, match=r"aten.index_put_? \(indexed dims: positions written at an index "
                                                 r"tensor.s values cannot shrink; prune the other dims"):
        g.group(m.a, "out", [1])


def test_parametrized_weight_norm_conv_prunes_whole_groups():
    """wav2vec2's positional conv: grouped, weight-normed over the kernel dim (``parametrizations.weight_norm``)."""
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1, groups=4), dim=2)
    m = nn.Sequential(nn.Conv1d(2, 8, 1), conv, nn.Conv1d(8, 2, 1)).eval()
    x = torch.randn(1, 2, 6)
    ref = copy.deepcopy(m)
    g = DependencyGraph(m, (x,))
    assert not g.unsupported
    grp = g.group(m[0], "out", [2, 3])                      # conv group 1 of the weight-normed conv, whole
    zero_slices_(ref, grp)
    with torch.no_grad():
        y0 = ref(x)
    grp.prune()
    assert (conv.groups, conv.in_channels, conv.out_channels) == (3, 6, 6)
    assert conv.parametrizations.weight.original1.shape == (6, 2, 3) and conv.weight.shape == (6, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_hook_weight_norm_refusal_says_how_to_get_past_it():
    conv = nn.utils.weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2)
    m = nn.Sequential(nn.Conv1d(2, 4, 1), conv, nn.Conv1d(4, 2, 1)).eval()
    g = DependencyGraph(m, (torch.randn(1, 2, 6),))
    assert not g.unsupported
    with pytest.raises(UnsupportedOpError, match="parametrizations.weight_norm, or remove_weight_norm"):
        g.group(m[0], "out", [1])
    nn.utils.remove_weight_norm(conv)
    g = DependencyGraph(m, (torch.randn(1, 2, 6),))
    g.group(m[0], "out", [1]).prune()                       # the plain conv prunes
    assert m[1].in_channels == 3 and m(torch.randn(1, 2, 6)).shape == (1, 2, 6)


def test_wav2vec2_hidden_width_prunes_through_its_weight_normed_positional_conv(tmp_path):
    """The hidden width was refused (weight norm without a rule, and ``h[mask_time] = masked_spec_embed``)."""
    transformers = pytest.importorskip("transformers")
    import brainsurgeon as bs

    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                      conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=3,
                                      classifier_proj_size=16)
    cfg._attn_implementation = "eager"
    m = transformers.Wav2Vec2ForSequenceClassification(cfg).eval()
    x = {"input_values": torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))}
    n0 = sum(p.numel() for p in m.parameters())
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("classifier",)), example_inputs=x)
    assert not any("failed verification" in n for n in rep.notes)
    assert sum(p.numel() for p in m.parameters()) < 0.4 * n0
    pos = m.wav2vec2.encoder.pos_conv_embed.conv
    assert pos.groups == 2 and pos.in_channels == pos.out_channels == m.wav2vec2.masked_spec_embed.shape[0] == 32
    with torch.no_grad():
        ref = m(**x).logits
    with torch.no_grad():
        assert torch.equal(reload_hf(m, tmp_path)(**x).logits, ref)
