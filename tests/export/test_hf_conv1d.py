"""transformers' Conv1D (GPT-2: weight [in, out]) through pack_, bs.save/load (brainsurgeon and hf folders)
and the serving formats, as nn.Linear goes: tiny random GPT-2, quantized by GPTQ, exact where the format is."""

from __future__ import annotations

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.errors import FormatError

tf = pytest.importorskip("transformers")
QUANT = bs.GPTQ(bits=4, group_size=32)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _gpt2():
    """GPT-2, 2 blocks, 4 heads of 16, vocab 128, on a 4-bit grid (lm_head, tied to wte, kept dense)."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    cfg._attn_implementation = "eager"
    m = tf.GPT2LMHeadModel(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))}]
    bs.quantize_(m, QUANT, calib=calib, ignore=("lm_head",))
    return m


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


def _conv1d_names(m):
    return [n for n, mod in m.named_modules() if type(mod).__name__ == "Conv1D"]


def test_pack_swaps_every_conv1d_and_computes_the_same():
    m = _gpt2()
    ref, names = _logits(m), _conv1d_names(m)
    assert len(names) == 8
    rows = bs.pack_(m, bs.Pack(bits=4, group_size=32, compute_dtype="float32"), ignore=("lm_head",))
    assert sorted(r.name for r in rows) == sorted(names) and not _conv1d_names(m)
    c_fc = m.transformer.h[0].mlp.c_fc
    assert (c_fc.in_features, c_fc.out_features) == (64, 256)     # Conv1D weight [64, 256] read as Linear 256 x 64
    assert torch.equal(_logits(m), ref)


@pytest.mark.parametrize("fmt", ["brainsurgeon", "hf"])
def test_packed_gpt2_round_trips_exactly(tmp_path, fmt):
    m = _gpt2()
    bs.pack_(m, bs.Pack(bits=4, group_size=32, compute_dtype="float32"), ignore=("lm_head",))
    ref = _logits(m)
    bs.save(m, str(tmp_path / "m"), format=fmt)
    again = bs.load(str(tmp_path / "m"))
    assert type(again.transformer.h[1].attn.c_attn).__name__ == type(m.transformer.h[1].attn.c_attn).__name__
    assert again.config._attn_implementation == "eager"   # the kernels the model was saved with
    assert torch.equal(_logits(again), ref)


@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed"])
def test_gptq_writes_conv1d_in_linear_layout(tmp_path, packed):
    from safetensors.torch import load_file

    m = _gpt2()
    ref = _logits(m)
    if packed:
        bs.pack_(m, bs.Pack(bits=4, group_size=32, compute_dtype="float32"), ignore=("lm_head",))
    bs.save(m, str(tmp_path / "g"), format="gptq", quant=None if packed else QUANT)
    sd = load_file(str(tmp_path / "g" / "model.safetensors"))
    assert sd["transformer.h.0.mlp.c_fc.qweight"].shape == (64 // 8, 256)   # [in / 8 codes per int32, out]
    again = bs.load(str(tmp_path / "g"))
    assert _conv1d_names(again) == _conv1d_names(_gpt2())
    assert (_logits(again) - ref).abs().max() < 1e-3   # float16 scales, as for Linear layers


def test_compressed_tensors_refuses_conv1d_and_names_the_fix(tmp_path):
    m = _gpt2()
    with pytest.raises(FormatError, match="Conv1D.*format='gptq'"):
        bs.save(m, str(tmp_path / "ct"), format="compressed-tensors", quant=QUANT)
    assert not (tmp_path / "ct").exists()
