"""transformers models: the config follows the pruned widths; save_pretrained/from_pretrained reproduces outputs."""

from __future__ import annotations

import pytest
import torch
from graph_fixtures import build

from brainsurgeon.graph import DependencyGraph

pytest.importorskip("transformers")


def test_llama_gqa_roundtrip_through_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    m, x = build("TinyLlamaGQA")
    g = DependencyGraph(m, x)
    groups = [grp for grp in g.groups() if grp.exact]          # kv-head groups and FFN groups of each layer
    g.prune([grp.select(torch.arange(grp.n // 2)) for grp in groups])
    cfg = m.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 1, 12)
    assert not hasattr(cfg, "brainsurgeon_layer_widths")
    m.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, m(**x).logits, rtol=0, atol=0)


def test_bert_non_uniform_widths_are_recorded_per_layer():
    m, x = build("TinyBERT")
    g = DependencyGraph(m, x)
    g.group("encoder.layer.0.intermediate.dense", "out", range(6)).prune()
    cfg = m.config
    assert cfg.intermediate_size == 24                           # layer 1 still has 24
    widths = cfg.brainsurgeon_layer_widths
    assert widths["encoder.layer.0.intermediate"]["intermediate_size"] == 18
    assert widths["encoder.layer.1.intermediate"]["intermediate_size"] == 24


@pytest.mark.parametrize("name", ["TinyBERT", "TinyLlamaGQA"])
def test_non_uniform_widths_round_trip_through_our_from_pretrained(tmp_path, name):
    """Different heads/FFN widths per layer, a narrower hidden size and within-head dims in one layer's
    set: the config cannot express them; brainsurgeon.export.from_pretrained rebuilds the exact model."""
    from brainsurgeon.export import from_pretrained, save_pretrained
    from brainsurgeon.prune import head_dim_sets, pair_groups

    m, x = build(name)
    g = DependencyGraph(m, x)
    g.prune([grp.select(torch.arange(i % 2 + 1)) for i, grp in enumerate(g.groups()) if grp.n > 2])
    ffn = {"TinyBERT": "encoder.layer.1.intermediate.dense", "TinyLlamaGQA": "model.layers.1.mlp.up_proj"}[name]
    g.group(ffn, "out", range(3)).prune()                     # layer 1's FFN narrower than layer 0's
    g = DependencyGraph(m, x)
    first = head_dim_sets(g)[0]
    joint, _ = pair_groups(first, [torch.arange(grp.n, dtype=torch.float32) for grp in first])
    g.prune([joint.select([0])])
    widths = m.config.brainsurgeon_layer_widths
    per_field: dict[str, set] = {}
    for w in widths.values():
        for f, v in w.items():
            if f != "inv_freq":
                per_field.setdefault(f, set()).add(v)
    assert any(len(vs) > 1 for vs in per_field.values())      # some width differs between layers
    assert "head_dim" in per_field
    with torch.no_grad():
        ref = m(**x)
    save_pretrained(m, str(tmp_path / "hf"))
    again = from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        out = again(**x)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=0, atol=0)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in m.parameters())


def test_deberta_v2_heads_follow_its_query_proj_names():
    """DeBERTa-v2 names its projections query_proj/key_proj/value_proj and reshapes with the module's
    num_attention_heads / attention_head_size: they follow the pruned widths and no group fails verification."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    import brainsurgeon as bs

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=32, num_labels=3)  # absolute positions
    m = DebertaV2ForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        shape = m(**x).logits.shape
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("classifier",)), example_inputs=x)
    assert not any("failed verification" in n for n in rep.notes)
    att = m.deberta.encoder.layer[0].attention.self
    assert att.query_proj.out_features == att.num_attention_heads * att.attention_head_size == att.all_head_size
    assert att.query_proj.out_features < 32  # the attention groups were pruned, not left out
    with torch.no_grad():
        assert m(**x).logits.shape == shape
