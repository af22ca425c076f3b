"""Pruned HF models of many families reload with exactly the same outputs (issue 14 #4, #5).

Each family is built from a tiny random config, pruned by ``prune_`` (50 %, head ignored), saved with
``save_pretrained`` and loaded back: with the family's own ``from_pretrained`` when the config expresses
every width, else with ``brainsurgeon.export.from_pretrained`` (per-layer widths). Logits must be equal.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from graph_fixtures import reload_hf  # noqa: E402

import brainsurgeon as bs  # noqa: E402

DEC = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}
FAMILIES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DEC, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**DEC, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**DEC, "pad_token_id": 0}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DEC),
    "opt": ("OPTConfig", "OPTForCausalLM", {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "ffn_dim": 128, "max_position_embeddings": 64,
                                            "word_embed_proj_dim": 64}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {k: v for k, v in DEC.items() if k != "num_key_value_heads"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                               "n_positions": 64}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"vocab_size": 128, "hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**DEC, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "t5": ("T5Config", "T5ForConditionalGeneration", {"vocab_size": 128, "d_model": 64, "d_kv": 16, "d_ff": 128,
                                                      "num_layers": 2, "num_heads": 4}),
}


def _build(fam):
    cfg_name, cls_name, kw = FAMILIES[fam]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "decoder_input_ids": ids[:, :6]} if fam == "t5" else {"input_ids": ids}
    return model, x


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_pruned_family_reloads_with_identical_logits(tmp_path, fam):
    m, x = _build(fam)
    n0 = sum(p.numel() for p in m.parameters())
    bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("lm_head",)), example_inputs=x)
    assert sum(p.numel() for p in m.parameters()) < 0.75 * n0
    with torch.no_grad():
        ref = m(**x).logits
    with torch.no_grad():
        assert torch.equal(reload_hf(m, tmp_path)(**x).logits, ref)


def test_config_fields_the_families_derive_are_explicit():
    m, x = _build("qwen2")
    bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("lm_head",)), example_inputs=x)
    assert m.config.hidden_size == 32 and m.config.head_dim == 16       # rotary tables sized by head_dim
    m, x = _build("opt")
    bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("lm_head",)), example_inputs=x)
    assert m.config.word_embed_proj_dim == m.config.hidden_size == 32 and m.config.ffn_dim == 64


def test_vision_and_audio_models_need_no_input_embeddings():
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=3)
    m = transformers.ConvNextForImageClassification(cfg).eval()
    x = {"pixel_values": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    n0 = sum(p.numel() for p in m.parameters())
    bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("classifier",)), example_inputs=x)
    assert sum(p.numel() for p in m.parameters()) < 0.75 * n0 and m(**x).logits.shape == (1, 3)


def test_swin_per_stage_heads():
    cfg = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                  window_size=4, num_labels=3)
    m = transformers.SwinForImageClassification(cfg).eval()
    x = {"pixel_values": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("classifier",)), example_inputs=x)
    assert m(**x).logits.shape == (1, 3)


PIX = {"pixel_values": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
RENAMED = {"vit", "swin", "segformer"}
ENCODERS = {  # transformers >= 5 saves RENAMED under their original key names (weight-conversion mapping reversed)
    "vit": ("ViTConfig", "ViTModel", {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "intermediate_size": 64}, PIX),
    "swin": ("SwinConfig", "SwinModel", {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1],
                                         "num_heads": [2, 4], "window_size": 4}, PIX),       # per-stage head tables
    "segformer": ("SegformerConfig", "SegformerModel", {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1],
                                                        "hidden_sizes": [16, 32], "num_attention_heads": [1, 2]}, PIX),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model",                                        # weight-norm pos conv
                 {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                  "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3),
                  "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4},
                 {"input_values": torch.rand(1, 800, generator=torch.Generator().manual_seed(0))}),
}


@pytest.mark.parametrize("fam", sorted(ENCODERS))
def test_pruned_encoder_reloads_with_identical_outputs(tmp_path, fam):
    from safetensors import safe_open

    from brainsurgeon.export import from_pretrained, save_pretrained

    cfg_name, cls_name, kw, x = ENCODERS[fam]
    torch.manual_seed(0)
    m = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw)).eval()
    n0 = sum(p.numel() for p in m.parameters())
    bs.prune_(m, bs.ChannelPruning(ratio=0.5), example_inputs=x)
    assert sum(p.numel() for p in m.parameters()) < 0.75 * n0
    with torch.no_grad():
        ref = m(**x).last_hidden_state
    save_pretrained(m, str(tmp_path / "m"))
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert (saved != set(m.state_dict())) == (fam in RENAMED)     # written under transformers' original names
    again = from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, ref)
    if not getattr(m.config, "brainsurgeon_layer_widths", None):  # the config expresses every width
        plain = type(m).from_pretrained(tmp_path / "m").eval()
        with torch.no_grad():
            assert torch.equal(plain(**x).last_hidden_state, ref)


@pytest.mark.parametrize("fam", sorted(ENCODERS))
def test_unpruned_encoder_file_reloads_in_plain_transformers(tmp_path, fam):
    """The file keeps transformers' own layout (original names, weight-norm g/v): its loader reads it."""
    from torch.nn.utils import parametrize

    from brainsurgeon.export import from_pretrained, save_pretrained

    cfg_name, cls_name, kw, x = ENCODERS[fam]
    torch.manual_seed(0)
    m = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw)).eval()
    with torch.no_grad():
        ref = m(**x).last_hidden_state
    save_pretrained(m, str(tmp_path / "m"))
    for again in (type(m).from_pretrained(tmp_path / "m").eval(), from_pretrained(str(tmp_path / "m"))):
        with torch.no_grad():
            assert torch.equal(again(**x).last_hidden_state, ref)
        if fam == "wav2vec2":
            assert parametrize.is_parametrized(again.encoder.pos_conv_embed.conv)


def test_converted_tensors_are_saved_under_state_dict_names(tmp_path):
    """Mixtral's fused experts are split by transformers' save conversion: written as they are instead
    (save_original_format=False), and both loaders give identical logits."""
    from brainsurgeon.export import from_pretrained, save_pretrained

    m, x = _build("mixtral")
    with torch.no_grad():
        ref = m(**x).logits
    save_pretrained(m, str(tmp_path / "m"))
    plain = type(m).from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(from_pretrained(str(tmp_path / "m"))(**x).logits, ref)
        assert torch.equal(plain(**x).logits, ref)


@pytest.mark.parametrize("fam", ["gpt2", "bloom"])
def test_a_per_layer_record_skips_the_meta_rebuild_and_still_reloads_exactly(tmp_path, fam, monkeypatch):
    """Issue 14, speed: with ``config.brainsurgeon_layer_widths`` already written by the config sync, our loader
    resizes every tensor from the saved weights, so ``prune_`` skips the rebuild check (a model built on the
    meta device); the note still sends the user to our loader, and the reload is exact (gpt2: the rebuild
    would find nothing, bloom: its MLP is always 4 x hidden, the rebuild would find mismatches)."""
    from brainsurgeon.export import from_pretrained, save_pretrained
    from brainsurgeon.graph import hf

    def boom(model):
        raise AssertionError("rebuild check ran although a per-layer record exists")

    monkeypatch.setattr(hf, "rebuild_mismatches", boom)
    m, x = _build(fam)
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("lm_head",)), example_inputs=x)
    assert m.config.brainsurgeon_layer_widths
    assert any("brainsurgeon.export.from_pretrained" in n for n in rep.notes)
    with torch.no_grad():
        ref = m(**x).logits
    save_pretrained(m, str(tmp_path / "m"))
    again = from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(again(**x).logits, ref)


def test_without_a_record_the_rebuild_check_still_runs(monkeypatch):
    """The shortcut is only for models with a per-layer record: llama (uniform widths) is still checked."""
    from brainsurgeon.graph import hf

    calls = []
    real = hf.rebuild_mismatches
    monkeypatch.setattr(hf, "rebuild_mismatches", lambda model: calls.append(1) or real(model))
    m, x = _build("llama") if "llama" in FAMILIES else _build("qwen2")
    bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("lm_head",)), example_inputs=x)
    assert not getattr(m.config, "brainsurgeon_layer_widths", None) and calls == [1]


@pytest.mark.parametrize("fam", ["bloom", "qwen2"])
def test_rebuild_check_on_the_cpu_finds_what_the_meta_build_finds(fam, monkeypatch):
    """Issue 14, speed: a small model's rebuild check builds it on the CPU (no weight init) instead of the meta
    device; the mismatches are the same (bloom: its MLP is 4 x hidden, so some; qwen2: none)."""
    from brainsurgeon.graph import hf

    m, x = _build(fam)
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("lm_head",)), example_inputs=x)
    assert rep.metrics["params"]["after"] < rep.metrics["params"]["before"]
    if hasattr(m.config, "brainsurgeon_layer_widths"):
        del m.config.brainsurgeon_layer_widths
    on_cpu = hf.rebuild_mismatches(m)
    monkeypatch.setattr(hf, "_CPU_BUILD_BYTES", -1)   # every model on the meta device, as before
    assert hf.rebuild_mismatches(m) == on_cpu
    assert bool(on_cpu) == (fam == "bloom")
