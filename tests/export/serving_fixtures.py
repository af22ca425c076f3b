"""A tiny random Llama, compressed by our verbs, for the serving-format tests (compressed-tensors, GPTQ, GGUF)."""

from __future__ import annotations

import copy
import functools

import torch

import brainsurgeon as bs

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
IGNORE = ("lm_head",)


def tiny_llama():
    """Llama, 2 blocks, hidden 128 (4 heads of 32, 2 kv heads), MLP 256, vocab 128, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def _calib():
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, 128, (4, 32), generator=g), "use_cache": False}]


@functools.cache
def _compressed(kind: str):
    m = tiny_llama()
    quant = None
    if kind.startswith("2:4"):
        bs.sparsify_(m, bs.SparseGPT(pattern="2:4"), _calib(), ignore=IGNORE)
    q = kind.split("+")[-1]
    if q[0] in "wor":  # GPTQ w4g128, w8, w4g32 (GGUF Q4_0), w8g32 (Q8_0), w4g64a (asymmetric); OBQ o..; RTN r..
        bits = int(q[1])
        gs = int(q.split("g")[1].rstrip("a")) if "g" in q else 0
        cls = {"w": bs.GPTQ, "o": bs.OBQ, "r": bs.RTN}[q[0]]
        quant = cls(bits=bits, group_size=gs, sym=not q.endswith("a"))
        bs.quantize_(m, quant, _calib(), ignore=IGNORE)
    return m, quant


def compressed(kind: str):
    """(model, quant config) for 'w4g128', 'w8', '2:4', '2:4+w4g128', 'w4g32', 'w8g32', 'w4g64a'; a fresh copy."""
    m, q = _compressed(kind)
    return copy.deepcopy(m), q


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()
