"""compressed-tensors checkpoints (llm-compressor's format; read by vLLM and by transformers).

An HF folder (``config.json`` + ``model.safetensors``) whose ``config.json`` carries a
``quantization_config`` with ``quant_method: compressed-tensors``. Each quantized Linear ``L`` stores,
with the names compressed-tensors 0.20 uses (``compressors/pack_quantized``, ``naive_quantized``):

=========================  =================================================================
``L.weight_packed``        int32 rows x ceil(cols * bits / 32): signed codes ``q - zero`` + 2^(bits-1),
                           element ``i`` of a row at bits ``[i*bits, (i+1)*bits)`` of the row's bit
                           stream (``format: pack-quantized``, 2..8 bits)
``L.weight``               int8 rows x cols signed codes (``format: int-quantized``, 8 bits)
``L.weight_scale``         float rows x groups (``strategy: group``) or rows x 1 (``channel``)
``L.weight_zero_point``    only when ``symmetric: false``: int32 (packed along rows) or int8
``L.weight_shape``         int64 ``[rows, cols]`` (pack-quantized)
=========================  =================================================================

so that ``W = weight_scale * (codes - weight_zero_point)`` per group, exactly our grid. The codes
are the ones the quantizers left (:mod:`~brainsurgeon.export.layercodes`); nothing is re-rounded.
Static groups are contiguous in column order (our GPTQ/OBQ act-order keeps them so), so no
``g_idx`` is written (compressed-tensors 0.20 no longer reads one).

Sparsity: compressed-tensors 0.20 removed its sparse compressors (``sparse-bitmask``,
``sparse-24-bitmask``; transformers refuses them), so sparse weights are stored dense (the zeros
are zero codes) and the structure is recorded in ``sparsity_config`` (``format: dense``,
``sparsity_structure: 2:4 | unstructured``, ``global_sparsity``) for kernels that use it.

    >>> save_compressed_tensors(lm, "out/ct", quant=bs.GPTQ(bits=4, group_size=128), tokenizer=tok)
    >>> AutoModelForCausalLM.from_pretrained("out/ct")      # with compressed-tensors installed
    >>> again = load_compressed_tensors("out/ct")           # ours: float Linears on the same grid
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..errors import FormatError
from .checkpoint import check_target, split_tensors
from .layercodes import LayerCodes, check_hf_shapes, collect_codes, load_decoded, read_hf_folder, write_hf_folder

log = get_logger(__name__)

FORMATS = ("pack-quantized", "int-quantized")
CT_VERSION = "0.20.1"  # the compressed-tensors release whose names and layouts this module follows


def pack_int32(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows x cols, each < 2^bits) -> int32 rows x ceil(cols*bits/32), dense bit stream.

    Element i of a row occupies bits [i*bits, (i+1)*bits) of the row (little-endian words), the
    layout of compressed-tensors' ``pack_to_int32`` (which adds the 2^(bits-1) offset itself).
    """
    rows, cols = v.shape
    pad = (-cols) % 32
    v = torch.nn.functional.pad(v.to(torch.int64), (0, pad))  # rows x 32k
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((v[..., None] >> shifts) & 1).reshape(rows, -1, 32)  # rows x words x 32 bits
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)  # rows x words, in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words[:, :math.ceil(cols * bits / 32)].contiguous()


def unpack_int32(w: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 rows x words -> int64 unsigned codes rows x cols."""
    w = w.to(torch.int64) & 0xFFFFFFFF
    stream = (w[..., None] >> torch.arange(32, dtype=torch.int64)) & 1  # rows x words x 32
    stream = stream.reshape(w.shape[0], -1)
    n = stream.shape[1] // bits
    elems = stream[:, :n * bits].reshape(w.shape[0], n, bits)
    return (elems << torch.arange(bits, dtype=torch.int64)).sum(-1)[:, :cols]


def _weights_args(bits: int, group_size: int, cols: int, sym: bool) -> dict[str, Any]:
    channel = group_size in (0, cols)
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel" if channel else "group",
            "group_size": None if channel else group_size, "dynamic": False, "actorder": None,
            "block_structure": None}  # no "observer": the grid was fitted by our solver, not a CT observer


def _scheme_key(lc: LayerCodes) -> tuple[int, int, bool]:
    c = lc.codes
    gs = 0 if c.group_size == lc.shape[1] else c.group_size
    return c.bits, gs, bool((c.zero == 2 ** (c.bits - 1)).all())


def _sparsity(layers: dict[str, LayerCodes]) -> dict[str, Any] | None:
    """sparsity_config for the Linears with zeros: 2:4 if every one is, else unstructured; None if dense."""
    zeros = {n: int((lc.weight == 0).sum()) for n, lc in layers.items()}
    sparse = [n for n, z in zeros.items() if z >= 0.25 * layers[n].weight.numel()]  # zeros by design, not chance
    if not sparse:
        return None
    def is24(W: torch.Tensor) -> bool:
        return W.shape[1] % 4 == 0 and bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
    structure = "2:4" if all(is24(layers[n].weight) for n in sparse) else "unstructured"
    total = sum(layers[n].weight.numel() for n in sparse)
    return {"format": "dense", "sparsity_structure": structure, "targets": sparse,
            "ignore": [n for n in layers if n not in sparse],
            "global_sparsity": round(sum(zeros[n] for n in sparse) / total, 6)}


def quantization_config(layers: dict[str, LayerCodes], fmt: str) -> dict[str, Any]:
    """The ``quantization_config`` dict of config.json for the coded layers (one config group per grid)."""
    coded = {n: lc for n, lc in layers.items() if lc.codes is not None}
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for n, lc in coded.items():
        groups.setdefault(_scheme_key(lc), []).append(n)
    one = len(groups) == 1
    cfg_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(groups.items()):
        cols = layers[names[0]].shape[1] if gs == 0 else 0
        cfg_groups[f"group_{i}"] = {"targets": ["Linear"] if one else names,
                                    "weights": _weights_args(bits, gs, cols, sym),
                                    "input_activations": None, "output_activations": None, "format": fmt}
    out = {"quant_method": "compressed-tensors", "format": fmt if coded else "dense",
           "quantization_status": "compressed", "config_groups": cfg_groups,
           "ignore": [n for n in layers if n not in coded], "kv_cache_scheme": None, "global_compression_ratio": None,
           "version": CT_VERSION, "sparsity_config": _sparsity(layers) or {}, "transform_config": {}}
    return out


def _layer_tensors(lc: LayerCodes, fmt: str) -> dict[str, torch.Tensor]:
    c = lc.codes
    rows, cols = lc.shape
    half = 2 ** (c.bits - 1)
    signed = c.q.to(torch.int64) - half  # compressed-tensors' signed codes in [-2^(b-1), 2^(b-1))
    zp = c.zero.to(torch.int64) - half
    sym = bool((zp == 0).all())
    out = {"weight_scale": c.scale.to(torch.float32).contiguous()}
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_int32(signed + half, c.bits)
        out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if not sym:
            out["weight_zero_point"] = pack_int32((zp + half).t().contiguous(), c.bits).t().contiguous()
    else:
        out["weight"] = signed.to(torch.int8)
        if not sym:
            out["weight_zero_point"] = zp.to(torch.int8)
    if lc.bias is not None:
        out["bias"] = lc.bias
    return out


def _check(model: nn.Module, layers: dict[str, LayerCodes], fmt: str) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"compressed-tensors: fmt={fmt!r}; allowed: {list(FORMATS)}")
    conv1d = check_hf_shapes(model, "compressed-tensors")
    for n, lc in layers.items():
        if lc.codes is None:
            continue
        if n in conv1d:   # compressed-tensors 0.20 quantizes nn.Linear only: it would load this layer as random
            raise FormatError(f"layer {n} is a transformers Conv1D (GPT-2 style, weight [in, out]); the "
                              f"compressed-tensors loader only decompresses nn.Linear layers and would leave it "
                              f"randomly initialised. Save with format='gptq' (Conv1D in Linear layout, as GPTQ "
                              f"packers store it), or 'brainsurgeon' / 'hf' (packed layers kept), or keep these "
                              f"layers dense with ignore=[..., {n!r}]")
        if fmt == "pack-quantized" and not _scheme_key(lc)[2]:
            raise FormatError(f"layer {n} is on an asymmetric grid (zero points); compressed-tensors 0.20's loader "
                              f"expects an unpacked weight_zero_point for pack-quantized and rejects the packed "
                              f"one its own compressor writes. Quantize with sym=True, or for 8 bits pass "
                              f"fmt='int-quantized'")
        if fmt == "int-quantized" and lc.codes.bits != 8:
            raise FormatError(f"layer {n}: int-quantized stores 8-bit codes, the layer has {lc.codes.bits}-bit; "
                              f"use fmt='pack-quantized'")
    tied = getattr(model.config, "tie_word_embeddings", False)
    for n, lc in layers.items():
        if lc.codes is not None and tied and n.endswith("lm_head"):
            raise FormatError(f"layer {n} is quantized but tied to the input embeddings (tie_word_embeddings); "
                              f"a loader re-ties it to the float embedding. Keep it dense (ignore=['lm_head'])")


def save_compressed_tensors(model: nn.Module, folder: str, *, quant: Any = None, tokenizer: Any = None,
                            ignore: Iterable[str] = ("lm_head",), fmt: str = "pack-quantized") -> str:
    """Write `model` (an HF transformers model) as a compressed-tensors folder, atomically; returns the path.

    quant: the grid the float Linears were quantized to (the GPTQ/OBQ/RTN config); packed layers
    carry their own. ignore: Linears kept dense. fmt: ``pack-quantized`` (2..8 bits in int32) or
    ``int-quantized`` (8-bit codes as int8). Everything is checked before the first byte is written.

    >>> save_compressed_tensors(lm, "out/ct", quant=bs.GPTQ(bits=4, group_size=128), tokenizer=tok)
    'out/ct'
    """

    layers = collect_codes(model, quant, ignore)
    _check(model, layers, fmt)
    check_target(folder)
    qcfg = quantization_config(layers, fmt)
    tensors, _ = split_tensors(model)
    for n, lc in layers.items():
        if lc.codes is None:
            continue
        for k in [k for k in tensors if k.startswith(n + ".")]:
            del tensors[k]
        tensors.update({f"{n}.{k}": t for k, t in _layer_tensors(lc, fmt).items()})
    write_hf_folder(model, folder, tensors, qcfg, tokenizer)
    n_q = sum(lc.codes is not None for lc in layers.values())
    log.info("compressed-tensors: wrote %d quantized and %d dense Linears to %s", n_q, len(layers) - n_q, folder)
    return folder


def _decode(sd: dict[str, torch.Tensor], name: str, args: dict[str, Any], fmt: str) -> torch.Tensor:
    bits = int(args["num_bits"])
    half = 2 ** (bits - 1)
    scale = sd.pop(f"{name}.weight_scale").to(torch.float32)
    if f"{name}.weight_packed" in sd:  # pack-quantized
        rows, cols = (int(x) for x in sd.pop(f"{name}.weight_shape"))
        q = unpack_int32(sd.pop(f"{name}.weight_packed"), bits, cols) - half
    elif f"{name}.weight" in sd and not sd[f"{name}.weight"].is_floating_point():  # int-quantized
        q = sd.pop(f"{name}.weight").to(torch.int64)
        rows, cols = q.shape
    else:
        raise FormatError(f"compressed-tensors: layer {name} has a weight_scale but neither an integer "
                          f"weight_packed nor weight; the {fmt!r} folder is incomplete or of another format")
    zp = sd.pop(f"{name}.weight_zero_point", None)
    if zp is None:
        zp = torch.zeros_like(scale, dtype=torch.int64)
    elif zp.dtype == torch.int32 and fmt == "pack-quantized":
        zp = unpack_int32(zp.t().contiguous(), bits, scale.shape[0]).t() - half
    gs = cols // scale.shape[1]
    s = scale.repeat_interleave(gs, dim=1)
    z = zp.to(torch.int64).reshape(scale.shape).repeat_interleave(gs, dim=1)
    return s * (q - z).to(torch.float32)


def load_compressed_tensors(folder: str) -> nn.Module:
    """Read a compressed-tensors folder into a plain transformers model whose Linears are on the saved grid.

    Each quantized Linear gets ``weight = scale * (codes - zero)`` in float32 (run ``pack_`` to
    get integer kernels). Needs transformers, not compressed-tensors.

    >>> lm = load_compressed_tensors("out/ct")
    """
    model, qc, sd = read_hf_folder(folder, lambda qc: qc.get("quant_method") == "compressed-tensors",
                                   "config.json has no compressed-tensors quantization_config")
    fmt = qc.get("format", "pack-quantized")
    groups = list(qc.get("config_groups", {}).values())
    ignore = set(qc.get("ignore") or [])
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name in ignore:
            continue
        g = next((g for g in groups if name in g["targets"] or "Linear" in g["targets"]), None)
        if g is None or f"{name}.weight_scale" not in sd:
            continue
        sd[f"{name}.weight"] = _decode(sd, name, g["weights"], g.get("format") or fmt)
    return load_decoded(model, sd, folder)
