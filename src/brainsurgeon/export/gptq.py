"""GPTQ-format checkpoints (``quant_method: gptq``, ``checkpoint_format: gptq``), as AutoGPTQ/GPTQModel write them.

An HF folder whose quantized Linears ``L`` hold (N = out_features, K = in_features, b = bits,
p = 32 / b codes per int32, G = K / group_size groups):

================  ====================  =============================================================
``L.qweight``     int32 K/p x N         unsigned codes ``q`` of ``W^T``, packed along K: word ``[i, n]``
                                        holds ``q[n, i*p + j]`` at bits ``[j*b, (j+1)*b)``
``L.qzeros``      int32 G x N/p         zero points minus one (the v1 format's offset), packed along N
``L.scales``      float16 G x N         ``W[n, k] = scales[g, n] * (q[n, k] - (qzeros[g, n] + 1))``
``L.g_idx``       int32 K               ``g_idx[k]`` = group of input column k (``k // group_size``)
================  ====================  =============================================================

The codes are the quantizers' own (:mod:`~brainsurgeon.export.layercodes`); the format's float16
scales move each weight by float16 rounding of its scale (relative <= 2^-11, logged). Groups are
contiguous (our act-order keeps static groups), so ``desc_act: false`` and a sorted ``g_idx``.

    >>> save_gptq(lm, "out/gptq", quant=bs.GPTQ(bits=4, group_size=128), tokenizer=tok)
    >>> again = load_gptq("out/gptq")                 # float Linears on the saved grid
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..errors import FormatError
from .checkpoint import check_target, split_tensors
from .layercodes import LayerCodes, check_hf_shapes, collect_codes, load_decoded, read_hf_folder, write_hf_folder

log = get_logger(__name__)

BITS = (2, 4, 8)  # widths that tile an int32 exactly (3-bit GPTQ packing straddles words: not written)


def pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (R x C, R divisible by 32/bits) -> int32 R*bits/32 x C, packed along rows (low bits first)."""
    p = 32 // bits
    v = v.to(torch.int64).reshape(v.shape[0] // p, p, v.shape[1])  # words x p x C
    w = (v << (bits * torch.arange(p, dtype=torch.int64))[None, :, None]).sum(1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words x C -> int64 codes words*32/bits x C."""
    p = 32 // bits
    u = w.to(torch.int64) & 0xFFFFFFFF
    v = (u[:, None, :] >> (bits * torch.arange(p, dtype=torch.int64))[None, :, None]) & (2**bits - 1)
    return v.reshape(-1, w.shape[1])


def _check(model: nn.Module, layers: dict[str, LayerCodes]) -> tuple[int, int]:
    check_hf_shapes(model, "gptq")
    coded = [lc for lc in layers.values() if lc.codes is not None]
    if not coded:
        raise FormatError("gptq: no quantized Linear to write; pass quant= (the config the model was quantized "
                          "with) or pack_ the model first")
    bits_set = {lc.codes.bits for lc in coded}
    grouped = {lc.codes.group_size for lc in coded if lc.codes.group_size < lc.shape[1]}
    gs = grouped.pop() if len(grouped) == 1 else -1
    per_row_wide = [lc.name for lc in coded if gs != -1 and lc.codes.group_size == lc.shape[1] > gs]
    if len(bits_set) > 1 or grouped or per_row_wide:
        raise FormatError(f"gptq: the layers use several grids (bits {sorted(bits_set)}, group sizes "
                          f"{sorted({lc.codes.group_size for lc in coded})}); the GPTQ config has one bits and one "
                          f"group_size. Quantize every layer alike or use format='compressed-tensors'")
    bits = bits_set.pop()
    if bits not in BITS:
        raise FormatError(f"gptq: {bits}-bit codes; this writer packs {list(BITS)} bits (whole codes per int32). "
                          f"Use format='compressed-tensors' (any width 2..8)")
    p = 32 // bits
    for n, lc in layers.items():
        if lc.codes is not None and (lc.shape[0] % p or lc.shape[1] % p):
            raise FormatError(f"layer {n}: shape {lc.shape} does not pack: GPTQ packs {p} {bits}-bit codes per int32 "
                              f"along in_features and out_features, so both must be divisible by {p}; keep the "
                              f"layer dense (ignore=[...]) or prune to a multiple of {p}")
        if lc.codes is not None and bool((lc.codes.zero == 0).any()):
            raise FormatError(f"layer {n}: a group has zero point 0, which the v1 GPTQ format (it stores zero - 1) "
                              f"cannot hold; quantize with sym=True or use format='compressed-tensors'")
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and layers.get("lm_head") is not None and layers["lm_head"].codes is not None:
        raise FormatError("lm_head is quantized but tied to the embeddings; keep it dense (ignore=['lm_head'])")
    return bits, gs


def _layer_tensors(lc: LayerCodes, bits: int) -> dict[str, torch.Tensor]:
    c = lc.codes
    cols = lc.shape[1]
    out = {"qweight": pack_rows(c.q.t().contiguous(), bits),  # K/p x N
           "qzeros": pack_rows(c.zero.to(torch.int64) - 1, bits).t().contiguous(),  # G x N/p
           "scales": c.scale.t().contiguous().to(torch.float16),  # G x N
           "g_idx": (torch.arange(cols) // c.group_size).to(torch.int32)}
    if lc.bias is not None:
        out["bias"] = lc.bias.to(torch.float16)
    return out


def gptq_config(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """The ``quantization_config`` of config.json (GPTQConfig / AutoGPTQ BaseQuantizeConfig fields)."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq",
            "pack_dtype": "int32", "meta": {"quantizer": ["brainsurgeon"]}}


def save_gptq(model: nn.Module, folder: str, *, quant: Any = None, tokenizer: Any = None,
              ignore: Iterable[str] = ("lm_head",)) -> str:
    """Write `model` (an HF transformers model) as a GPTQ-format folder, atomically; returns the path.

    quant: the grid the float Linears were quantized to (2, 4 or 8 bits, one group size for all);
    packed layers carry their own codes. ignore: Linears kept dense (float).

    >>> save_gptq(lm, "out/gptq", quant=bs.GPTQ(bits=4, group_size=128))
    'out/gptq'
    """

    layers = collect_codes(model, quant, ignore)
    bits, gs = _check(model, layers)
    check_target(folder)
    sym = all(bool((lc.codes.zero == 2 ** (bits - 1)).all()) for lc in layers.values() if lc.codes is not None)
    tensors, _ = split_tensors(model)
    worst = 0.0
    for n, lc in layers.items():
        if lc.codes is None:
            continue
        for k in [k for k in tensors if k.startswith(n + ".")]:
            del tensors[k]
        tensors.update({f"{n}.{k}": t for k, t in _layer_tensors(lc, bits).items()})
        s = lc.codes.scale
        worst = max(worst, float(((s.half().float() - s).abs() / s.abs().clamp_min(1e-30)).max()))
    write_hf_folder(model, folder, tensors, gptq_config(bits, gs, sym), tokenizer)
    log.info("gptq: wrote %d %d-bit layers to %s; float16 scales move weights by <= %.2g relative",
             sum(lc.codes is not None for lc in layers.values()), bits, folder, worst)
    return folder


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """The float32 weight N x K of one GPTQ (v1) layer."""
    q = unpack_rows(qweight, bits)  # K x N
    z = unpack_rows(qzeros.t().contiguous(), bits).t() + 1  # G x N
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).t().contiguous()


def load_gptq(folder: str) -> nn.Module:
    """Read a GPTQ-format folder into a plain transformers model with float Linears on the saved grid.

    Needs transformers only (no GPTQ kernels). ``>>> lm = load_gptq("out/gptq")``
    """
    model, qc, sd = read_hf_folder(
        folder, lambda qc: qc.get("quant_method") == "gptq" and qc.get("checkpoint_format", "gptq") == "gptq",
        "config.json is not a GPTQ (v1 'gptq' checkpoint_format) checkpoint")
    decoded = []
    for key in [k for k in sd if k.endswith(".qweight")]:
        n = key[: -len(".qweight")]
        decoded.append(f"{n}.weight")
        sd[f"{n}.weight"] = dequantize_gptq(sd.pop(key), sd.pop(f"{n}.qzeros"), sd.pop(f"{n}.scales"),
                                            sd.pop(f"{n}.g_idx"), int(qc["bits"]))
        if f"{n}.bias" in sd:
            sd[f"{n}.bias"] = sd[f"{n}.bias"].float()
    return load_decoded(model, sd, folder, decoded)
