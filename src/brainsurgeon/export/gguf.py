"""GGUF files for llama.cpp: a Llama-family model with our GPTQ/OBQ codes as ``Q4_0`` / ``Q8_0``.

A symmetric grid with groups of 32 is exactly a GGUF block: ``Q4_0`` stores per 32 weights one
float16 ``d`` and 32 nibbles ``n`` with ``w = d * (n - 8)`` (``qs[j]`` holds weight ``j`` in the low
nibble and ``j + 16`` in the high one); ``Q8_0`` one float16 ``d`` and 32 int8 ``k`` with
``w = d * k`` (ggml ``block_q4_0`` / ``block_q8_0``). Our codes ``k = q - zero`` of a 2..4-bit
symmetric g32 grid lie in ``[-8, 7]`` (a 5..8-bit one in ``[-128, 127]``), so they are written as
they are, never re-rounded; a group whose codes only fit negated (llama.cpp's own Q4_0 uses
``d = max / -8``) is stored with ``-d``. The one change is the format's float16 ``d``: the weights
move by at most float16 rounding of the scale (relative 2^-11), logged per file.

Tensor names and the Q/K row permutation follow llama.cpp's ``convert_hf_to_gguf.py``; the
metadata comes from the model's config, the tokenizer from an HF tokenizer or a source ``.gguf``.
Linears without codes (``ignore``, e.g. a tied ``lm_head``), embeddings and norms are float32.

    >>> bs.quantize_(lm, bs.GPTQ(bits=4, group_size=32), calib, ignore=("lm_head",))
    >>> save_gguf(lm, "out/lm-q4_0.gguf", quant=bs.GPTQ(bits=4, group_size=32), tokenizer=tok)
    >>> again = load_gguf("out/lm-q4_0.gguf")        # transformers' GGUF reader (dequantizes)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .._log import get_logger
from ..errors import FormatError
from .layercodes import LayerCodes, check_hf_shapes, collect_codes

log = get_logger(__name__)

BLOCK = 32
ARCHS = ("llama", "mistral")
_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise FormatError("GGUF export needs the gguf package: pip install 'brainsurgeon[serve]'") from e
    return gguf


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for an HF Llama state_dict key (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        sub, leaf = ".".join(parts[3:-1]), parts[-1]
        if sub in _BLOCK_NAMES:
            return f"blk.{parts[2]}.{_BLOCK_NAMES[sub]}.{leaf}"
    raise FormatError(f"GGUF: no llama.cpp name for tensor {hf_name!r}; only Llama-family tensors are supported")


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for rotary embeddings (convert_hf_to_gguf.py ``permute``), on rows of `t`."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _signed_blocks(lc: LayerCodes, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k rows x cols int64 in [-kmax-1, kmax], d rows x blocks float32) or FormatError naming the group."""
    c = lc.codes
    k = c.q.to(torch.int64) - c.zero.to(torch.int64).repeat_interleave(c.group_size, dim=1)
    kb = k.reshape(k.shape[0], -1, BLOCK)  # rows x blocks x 32
    lo, hi = kb.amin(-1), kb.amax(-1)
    fits, flip = (lo >= -kmax - 1) & (hi <= kmax), (-hi >= -kmax - 1) & (-lo <= kmax)
    use_flip = ~fits & flip
    if bool((~fits & ~flip).any()):
        r, b = (int(x) for x in torch.nonzero(~fits & ~flip)[0])
        raise FormatError(f"layer {lc.name}: row {r}, columns {b * BLOCK}..{b * BLOCK + BLOCK - 1} have codes "
                          f"{int(lo[r, b])}..{int(hi[r, b])} around the zero point; a GGUF block stores "
                          f"-{kmax + 1}..{kmax} (symmetric). Quantize with sym=True")
    sign = torch.where(use_flip, -1, 1)
    k = (kb * sign[..., None]).reshape(k.shape)
    d = c.scale.repeat_interleave(c.group_size // BLOCK, dim=1) * sign.float()
    return k, d


def _check_scale(name: str, d: torch.Tensor, k: torch.Tensor) -> float:
    """Max relative change of a used scale by float16 rounding; FormatError if one overflows or vanishes."""
    used = (k.reshape(k.shape[0], -1, BLOCK) != 0).any(-1)
    d16 = d.half().float()
    bad = used & (~torch.isfinite(d16) | (d16 == 0))
    if bool(bad.any()):
        r, b = (int(x) for x in torch.nonzero(bad)[0])
        raise FormatError(f"layer {name}: the scale {float(d[r, b]):.3g} of row {r}, block {b} does not fit "
                          f"GGUF's float16 block scale (range 6e-8..65504); rescale the layer or keep it dense "
                          f"(ignore=[...])")
    rel = ((d16 - d).abs() / d.abs().clamp_min(1e-30))[used]
    return float(rel.max()) if rel.numel() else 0.0


def encode_blocks(k: torch.Tensor, d: torch.Tensor, qtype: str) -> np.ndarray:
    """GGUF block bytes (uint8 rows x blocks*bytes) for signed codes k (rows x cols) and scales d (rows x blocks)."""
    rows = k.shape[0]
    kb = k.reshape(rows, -1, BLOCK)
    dd = d.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1, 2)
    if qtype == "Q4_0":
        n = (kb + 8).to(torch.uint8)
        qs = n[..., :16] | (n[..., 16:] << 4)  # low nibble: weight j, high nibble: weight j + 16
    else:
        qs = kb.to(torch.int8).view(torch.uint8)
    return torch.cat([dd, qs], dim=-1).reshape(rows, -1).numpy()


def _check(model: nn.Module, layers: dict[str, LayerCodes]) -> None:
    check_hf_shapes(model, "gguf")
    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise FormatError(f"GGUF export supports Llama-family models (model_type in {list(ARCHS)}), got "
                          f"{cfg.model_type!r}; save it with format='compressed-tensors' or 'brainsurgeon'")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise FormatError("GGUF export: this Llama config has attention/MLP biases, which llama.cpp's llama "
                          "architecture does not read; use format='compressed-tensors'")
    for n, lc in layers.items():
        if lc.codes is None:
            continue
        if lc.codes.group_size != BLOCK:
            raise FormatError(f"layer {n}: group size {lc.codes.group_size}; GGUF Q4_0/Q8_0 blocks hold exactly "
                              f"{BLOCK} weights with one scale. Quantize with group_size={BLOCK}, or keep it dense")
        if lc.codes.bits > 8:
            raise FormatError(f"layer {n}: {lc.codes.bits}-bit codes do not fit Q8_0")
        if n == "lm_head" and getattr(cfg, "tie_word_embeddings", False):
            raise FormatError("lm_head is quantized but tied to the embeddings; keep it dense (ignore=['lm_head'])")


def _metadata(w: Any, cfg: Any, name: str) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    w.add_rope_freq_base(float(theta or 10000.0))
    w.add_vocab_size(cfg.vocab_size)


def _tokenizer(w: Any, gguf: Any, tokenizer: Any) -> None:
    """Tokenizer metadata from a source .gguf file (copied) or an HF fast BPE tokenizer."""
    if tokenizer is None:
        log.warning("GGUF: no tokenizer given; transformers reads the weights, llama.cpp needs tokenizer=")
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        r = gguf.GGUFReader(str(tokenizer))
        for f in r.fields.values():
            if f.name.startswith("tokenizer."):
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        return
    import json

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(getattr(tokenizer, "all_special_tokens", []))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise FormatError(f"GGUF: tokenizer model {model.get('type')!r}; pass the source .gguf path as tokenizer= "
                          f"(its tokenizer fields are copied) or a BPE tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("pad_token_id", w.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))


def save_gguf(model: nn.Module, path: str, *, quant: Any = None, tokenizer: Any = None,
              ignore: Iterable[str] = ("lm_head",), name: str = "") -> str:
    """Write a Llama-family `model` with its g32 codes as a GGUF file (Q4_0 for 2..4 bits, Q8_0 for 5..8).

    quant: the grid the float Linears were quantized to (e.g. ``GPTQ(bits=4, group_size=32)``);
    packed layers carry their own. tokenizer: an HF BPE tokenizer or a source ``.gguf`` path whose
    ``tokenizer.*`` fields are copied. Everything is checked before the file is written (atomically).

    >>> save_gguf(lm, "out/lm.gguf", quant=bs.GPTQ(bits=4, group_size=32), tokenizer="src.gguf")
    'out/lm.gguf'
    """
    gguf = _gguf()
    layers = collect_codes(model, quant, ignore, check_sym=False)  # k or -k in range: checked per block below
    _check(model, layers)
    cfg = model.config
    out: dict[str, tuple[np.ndarray, Any]] = {}
    worst, types, out_names = 0.0, [], set()
    for key, t in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0]
        lc = layers.get(prefix)
        if lc is not None and lc.codes is not None:  # a float Linear's weight, or a packed one's buffers
            if f"{prefix}.weight" in out_names:
                continue
            qtype = "Q4_0" if lc.codes.bits <= 4 else "Q8_0"
            k, d = _signed_blocks(lc, 7 if qtype == "Q4_0" else 127)
            worst = max(worst, _check_scale(prefix, d, k))
            wkey = f"{prefix}.weight"
            k, d = _perm_qk(wkey, k, cfg), _perm_qk(wkey, d, cfg)
            out[gguf_name(wkey)] = (encode_blocks(k, d, qtype), getattr(gguf.GGMLQuantizationType, qtype))
            out_names.add(wkey)
            types.append(qtype)
        elif not (key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_word_embeddings)):
            out[gguf_name(key)] = (_perm_qk(key, t.detach().float().cpu(), cfg).numpy(), None)
    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if types.count("Q4_0") >= types.count("Q8_0") else \
        gguf.LlamaFileType.MOSTLY_Q8_0
    if not types:
        ftype = gguf.LlamaFileType.ALL_F32
    tmp = f"{os.path.abspath(path)}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        _metadata(w, cfg, name or getattr(cfg, "_name_or_path", "") or "brainsurgeon-llama")
        w.add_file_type(int(ftype))
        _tokenizer(w, gguf, tokenizer)
        for n, (arr, raw) in out.items():
            w.add_tensor(n, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log.info("GGUF: wrote %d tensors (%d %s) to %s; float16 block scales move weights by <= %.2g relative",
             len(out), len(types), "/".join(sorted(set(types))) or "F32", path, worst)
    return path


def _perm_qk(key: str, t: torch.Tensor, cfg: Any) -> torch.Tensor:
    if key.endswith("self_attn.q_proj.weight"):
        return _permute(t, cfg.num_attention_heads)
    if key.endswith("self_attn.k_proj.weight"):
        return _permute(t, cfg.num_key_value_heads)
    return t


def load_gguf(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read a GGUF file with transformers' GGUF reader (dequantizes every block to `dtype`).

    >>> lm = load_gguf("out/lm-q4_0.gguf")
    """
    from .hf import _transformers

    transformers = _transformers()
    folder, file = os.path.split(os.path.abspath(path))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype).eval()
