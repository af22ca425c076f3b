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
