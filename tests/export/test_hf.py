"""HF round trips: save_pretrained -> from_pretrained (and load with an HF path) for pruned/quantized transformers."""

from __future__ import annotations

import os

import pytest
import torch
from export_fixtures import Int8Linear, narrow_linear, narrowed_tiny_llama, tiny_llama_config

from brainsurgeon.errors import FormatError
from brainsurgeon.export import from_pretrained, load, read_manifest, save, save_pretrained

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_narrowed_llama_round_trip(tmp_path):
    model = narrowed_tiny_llama()
    ref = _logits(model)
    save_pretrained(model, str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "manifest.json"} <= set(os.listdir(tmp_path / "hf"))
    man = read_manifest(str(tmp_path / "hf"))
    assert man["modules"]["model.layers.1.mlp.up_proj"]["spec"]["out_features"] == 40  # config says 48
    assert man["attrs"]["model.layers.0.self_attn"]["num_key_value_groups"] == 1
    again = from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(_logits(again), ref)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # tie restored, stored once
    assert again.model.layers[0].mlp.down_proj.in_features == 24 and not again.training


def test_plain_hf_cannot_but_we_can(tmp_path):
    """HF's own from_pretrained cannot express per-layer widths; the override manifest is what makes it load."""
    model = narrowed_tiny_llama()
    save_pretrained(model, str(tmp_path / "hf"))
    try:
        plain = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    except (RuntimeError, ValueError):
        plain = None
    if plain is not None:  # newer transformers may re-initialise mismatched tensors instead of failing
        assert not torch.equal(_logits(plain), _logits(model))
    assert torch.equal(_logits(load(str(tmp_path / "hf"), str(tmp_path / "hf"))), _logits(model))


def test_quantized_llama_round_trip_and_save_with_model_fn(tmp_path):
    model = narrowed_tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.gate_proj = Int8Linear.from_linear(mlp.gate_proj)
    ref = _logits(model)
    save_pretrained(model, str(tmp_path / "hf"))
    assert isinstance(from_pretrained(str(tmp_path / "hf")).model.layers[1].mlp.gate_proj, Int8Linear)
    assert torch.equal(_logits(from_pretrained(str(tmp_path / "hf"))), ref)
    save(model, str(tmp_path / "bs"))  # the generic checkpoint of an HF model, loaded with a plain model_fn
    again = load(str(tmp_path / "bs"), lambda: transformers.LlamaForCausalLM(tiny_llama_config()).eval())
    assert torch.equal(_logits(again), ref)


def test_sparsified_bert_loads_with_plain_transformers(tmp_path):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.masked_fill_(m.weight.abs() < m.weight.abs().median(), 0.0)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    save_pretrained(model, str(tmp_path / "hf"))
    plain = transformers.BertModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).last_hidden_state, ref)
        assert torch.equal(from_pretrained(str(tmp_path / "hf"))(ids).last_hidden_state, ref)


def test_head_pruned_bert_round_trip(tmp_path):
    """BERT layer 0 keeps heads 0 and 3 of 4 (Q/K/V rows, output cols): attrs the config cannot hold."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    att = model.encoder.layer[0].attention
    keep = torch.cat([torch.arange(0, 8), torch.arange(24, 32)])
    for n in ("query", "key", "value"):
        setattr(att.self, n, narrow_linear(getattr(att.self, n), rows=keep))
    att.output.dense = narrow_linear(att.output.dense, cols=keep)
    att.self.num_attention_heads, att.self.all_head_size = 2, 16
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    save_pretrained(model, str(tmp_path / "hf"))
    again = from_pretrained(str(tmp_path / "hf"))
    assert again.encoder.layer[0].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.equal(again(ids).last_hidden_state, ref)


def test_from_pretrained_needs_a_manifest(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match=r"no manifest\.json; for a plain HF folder use transformers"):
        from_pretrained(str(tmp_path / "plain"))
    with pytest.raises(FormatError, match="not an HF PreTrainedModel"):
        save_pretrained(torch.nn.Linear(2, 2), str(tmp_path / "x"))
