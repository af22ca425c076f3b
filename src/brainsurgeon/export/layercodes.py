"""The integer codes the quantizers left in a model, read once for every serving-format writer.

A serving format (compressed-tensors, GPTQ, GGUF) stores ``W = scale * (q - zero)`` per (row,
group of input columns). The writers never quantize: they take the codes the model already holds.

- a packed module (:class:`~brainsurgeon.quant.packed.Int4WeightOnlyLinear`, ``Int8WeightOnlyLinear``)
  holds the codes, scales and zeros as buffers: they are read as they are;
- transformers' ``Conv1D`` (GPT-2, weight ``[in, out]``) is read as the Linear it is (weight transposed):
  every format stores it in Linear layout, and the readers transpose it back for a Conv1D module;
- a float ``nn.Linear`` left on a grid by ``quantize_`` (RTN/GPTQ/OBQ) has its codes read back with
  :func:`~brainsurgeon.quant.codes.recover_codes` for the grid the caller names (``quant=``, the
  config it quantized with), and the round trip ``scale * (q - zero) == W`` is checked bit for bit
  before anything is written; a layer that is not exactly on that grid is refused.

    >>> bs.quantize_(lm, bs.GPTQ(bits=4, group_size=128), calib, ignore=("lm_head",))
    >>> layers = collect_codes(lm, quant=bs.GPTQ(bits=4, group_size=128), ignore=("lm_head",))
    >>> layers["model.layers.0.mlp.up_proj"].codes.q.shape     # rows x cols int32 codes
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..errors import ConfigError, FormatError
from ..quant.codes import GridCodes, check_group_size, recover_codes
from ..quant.pack import hf_conv1d_as_linear
from ..quant.packed import _PackedLinear

log = get_logger(__name__)
ULP_TOL = 2.0**-22  # relative: float32 rounding of a float64 grid point (1 ulp = 2^-23 .. 2^-22)


@dataclass
class LayerCodes:
    """One Linear as a serving format sees it: its codes (None: stored dense), bias and zero count."""

    name: str
    codes: GridCodes | None
    weight: torch.Tensor  # rows x cols float32: the dequantized (or dense) weight, as our model runs it
    bias: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]


def _scheme(quant: Any) -> tuple[int, int, bool] | None:
    """(bits, group_size, sym) of a quantization config (GPTQ/OBQ/RTN/Pack) or None."""
    if quant is None:
        return None
    try:
        return int(quant.bits), int(quant.group_size), bool(getattr(quant, "sym", True))
    except AttributeError as e:
        raise ConfigError(f"quant={quant!r} has no bits/group_size; pass the config the model was quantized "
                          f"with, e.g. quant=bs.GPTQ(bits=4, group_size=128)") from e


def exact_codes(W: torch.Tensor, bits: int, group_size: int, sym: bool, name: str) -> GridCodes:
    """Codes of a float weight on a `bits`-bit grid, checked: ``scale * (q - zero)`` reproduces W.

The codes are exact integers; the float32 scale reproduces every weight to float32 rounding.

    >>> c = exact_codes(lin.weight.detach(), 4, 128, True, "fc1")
    """
    W = W.detach().to("cpu", torch.float32)
    try:
        codes = recover_codes(W, bits, group_size, name)
    except ConfigError as e:
        raise FormatError(f"cannot export: {e}") from e
    back = codes.dequantize()
    # the solvers fit the grid in float64 and round the result to float32, so one float32 scale per
    # group reproduces the weights to within float32 rounding (<= 1 ulp), never more: allow 2^-22 relative
    off = (back - W).abs() > ULP_TOL * W.abs()
    if bool(off.any()):
        n = int(off.sum())
        err = float((back - W).abs().max())
        raise FormatError(f"layer {name}: the {bits}-bit codes read back from the weight do not reproduce it "
                          f"({n} of {W.numel()} values differ by more than float32 rounding, max |diff| "
                          f"{err:.3g}); the weight is not on a {bits}-bit grid with groups of {group_size}, "
                          f"and a serving format would store a different model. Quantize it with quantize_(..., "
                          f"bits={bits}, group_size={group_size}) or pass the quant config it was quantized with")
    if sym and bool((codes.zero != 2 ** (bits - 1)).any()):
        raise FormatError(f"layer {name}: quant says sym=True but the weight is on an asymmetric grid "
                          f"(zero points other than {2 ** (bits - 1)}); pass quant with sym=False, or "
                          f"quantize with sym=True")
    return codes


def _packed_codes(m: _PackedLinear) -> GridCodes:
    return GridCodes(m.codes().cpu(), m.scale.detach().float().cpu(), m.zero.detach().float().cpu(),
                     m.bits, m.group_size)


def collect_codes(model: nn.Module, quant: Any = None, ignore: Iterable[str] = ("lm_head",),
                  check_sym: bool = True) -> dict[str, LayerCodes]:
    """name -> :class:`LayerCodes` for every Linear / HF Conv1D (float or packed) of `model`, in module order.

    quant: the grid float Linears were quantized to (a GPTQ/OBQ/RTN config); None writes float
    Linears dense. Packed modules always give their own codes. ignore: regexes of Linears kept dense.
    check_sym: refuse zero points off the symmetric grid when quant says sym=True (a writer that
    checks the codes' range itself, like GGUF's, passes False).
    Raises FormatError naming the layer if a float layer is not exactly on the named grid.
    """
    scheme = _scheme(quant)
    ign = [re.compile(p) for p in ignore]
    out: dict[str, LayerCodes] = {}
    for name, m in model.named_modules():
        if not name:
            continue
        skip = any(p.fullmatch(name) for p in ign)
        if isinstance(m, _PackedLinear):
            if skip:
                raise FormatError(f"layer {name} is packed ({type(m).__name__}) but matches ignore={list(ignore)}; "
                                  f"a packed layer cannot be written dense: drop it from ignore")
            c = _packed_codes(m)
            b = m.bias.detach().float().cpu() if m.bias is not None else None
            out[name] = LayerCodes(name, c, c.dequantize(), b)
        elif isinstance(m, nn.Linear) or hf_conv1d_as_linear(m) is not None:
            lin = m if isinstance(m, nn.Linear) else hf_conv1d_as_linear(m)
            W = lin.weight.detach().to("cpu", torch.float32)
            b = lin.bias.detach().float().cpu() if lin.bias is not None else None
            codes = None
            if scheme is not None and not skip:
                bits, gs, sym = scheme
                check_group_size(W.shape[1], gs, name)
                codes = exact_codes(W, bits, gs, sym and check_sym, name)
            out[name] = LayerCodes(name, codes, W, b)
    n_q = sum(lc.codes is not None for lc in out.values())
    log.info("collected %d Linear layers (%d with codes, %d dense)", len(out), n_q, len(out) - n_q)
    return out


def check_hf_shapes(model: nn.Module, fmt: str) -> set[str]:
    """Refuse a model whose tensors the HF config cannot rebuild (pruned widths, dropped heads).

    Builds the config's architecture on the meta device and compares every state_dict shape. Returns
    the names of the layers the config builds as transformers' ``Conv1D`` (stored ``[in, out]``).
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        raise FormatError(f"format {fmt!r} writes a Hugging Face model folder; {type(model).__name__} has no HF "
                          f"config (model.config). Use format='brainsurgeon' (or 'onnx') for this model")
    with torch.device("meta"):
        ref = type(model)(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    conv1d = {n for n, r in ref.named_modules() if hf_conv1d_as_linear(r) is not None}
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, _PackedLinear):
            got = {f"{name}.weight": (m.in_features, m.out_features) if name in conv1d else
                   (m.out_features, m.in_features)}
            if m.bias is not None:
                got[f"{name}.bias"] = (m.out_features,)
        elif next(m.children(), None) is None:
            got = {f"{name}.{k}" if name else k: tuple(v.shape) for k, v in m.state_dict().items()}
        else:
            continue
        bad += [f"{k}: {g} vs config {want.get(k)}" for k, g in got.items() if want.get(k) != g]
    if bad:
        raise FormatError(f"format {fmt!r}: {len(bad)} tensors do not have the shapes {type(model).__name__}'s "
                          f"config builds ({'; '.join(bad[:3])}); a pruned width or dropped head cannot be "
                          f"expressed by an HF config. Save with format='brainsurgeon' or 'hf' (our "
                          f"manifest rebuilds the widths), or prune uniformly")
    return conv1d


def write_hf_folder(model: nn.Module, folder: str, tensors: dict[str, torch.Tensor],
                    quantization_config: dict[str, Any], tokenizer: Any = None) -> None:
    """Write an HF folder atomically: the model's config.json with `quantization_config`, the tensors as
    model.safetensors and the tokenizer (the common tail of the compressed-tensors and GPTQ writers).

    >>> write_hf_folder(lm, "out/ct", {"lm_head.weight": w}, {"quant_method": "compressed-tensors"})
    """
    import json
    import shutil

    from safetensors.torch import save_file

    from .folder import commit_folder, temp_folder

    tmp = temp_folder(folder)
    try:
        model.config.save_pretrained(tmp)
        path = os.path.join(tmp, "config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["quantization_config"] = quantization_config
        cfg["architectures"] = [type(model).__name__]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        commit_folder(tmp, os.path.abspath(folder))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_hf_folder(folder: str, accepts: Callable[[dict[str, Any]], bool],
                   refusal: str) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """The random-weight transformers model of an HF folder's config.json, the config's
    ``quantization_config`` and the folder's model.safetensors tensors, for a format reader to decode
    before :func:`load_decoded`. A ``quantization_config`` that `accepts` refuses (``{}`` if absent)
    is a :class:`FormatError` saying ``f"{folder}: {refusal}"``, before anything is built.

    >>> model, qc, sd = read_hf_folder("out/gptq", lambda qc: qc.get("quant_method") == "gptq", "not GPTQ")
    """
    import json

    from safetensors.torch import load_file

    from .hf import _transformers

    transformers = _transformers()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    qc = cfg.pop("quantization_config", None) or {}
    if not accepts(qc):
        raise FormatError(f"{folder}: {refusal}")
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    cls = getattr(transformers, (config.architectures or ["AutoModel"])[0], None)
    model = cls(config) if cls is not None and cls is not transformers.AutoModel else \
        transformers.AutoModel.from_config(config)
    return model, qc, load_file(os.path.join(folder, "model.safetensors"))


def load_decoded(model: nn.Module, sd: dict[str, torch.Tensor], folder: str, decoded: Iterable[str] = ()) -> nn.Module:
    """Load the decoded float state dict `sd` into `model` (a tied ``lm_head`` may be absent; anything
    else missing or unexpected is a :class:`FormatError`), re-tie, and return the model in eval mode.
    ``decoded``: the weight keys the reader decoded (Linear layout): transposed for a ``Conv1D`` module.

    >>> lm = load_decoded(model, sd, "out/ct", decoded=["model.layers.0.mlp.up_proj.weight"])
    """
    decoded = set(decoded)
    mods = dict(model.named_modules())
    for key in [k for k in sd if k.endswith(".weight")]:   # decoded in Linear layout [out, in]
        m = mods.get(key[: -len(".weight")])
        if hf_conv1d_as_linear(m) is not None and key in decoded:
            sd[key] = sd[key].t().contiguous()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise FormatError(f"{folder}: tensors do not match {type(model).__name__}: missing "
                          f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()
