"""One entry point for every on-disk format: ``save(model, path, format=...)`` and ``load(path)``.

=======================  ====================================================  =========================
format                   what is written                                       read back by
=======================  ====================================================  =========================
``brainsurgeon``         safetensors + our manifest (any model; default)        ``load(path, model_fn)``
``hf``                   HF ``save_pretrained`` folder + our manifest           ``load(path)``, transformers
``compressed-tensors``   HF folder, ``quantization_config`` (llm-compressor)    ``load(path)``, transformers, vLLM
``gptq``                 HF folder, ``quant_method: gptq`` (qweight/qzeros/...)  ``load(path)``, AutoGPTQ/GPTQModel
``gguf``                 one ``.gguf`` file, Q4_0 / Q8_0 (llama.cpp)            ``load(path)``, llama.cpp, transformers
``onnx``                 one ``.onnx`` file, checked with onnxruntime           onnxruntime
=======================  ====================================================  =========================

    >>> save(model, "out/ckpt")                                            # ours
    >>> save(lm, "out/ct", format="compressed-tensors", quant=bs.GPTQ(bits=4, group_size=128))
    >>> save(lm, "out/lm.gguf", format="gguf", quant=bs.GPTQ(bits=4, group_size=32), tokenizer=tok)
    >>> save(model, "out/m.onnx", format="onnx", example_inputs=(x,))
    >>> lm = load("out/ct")                                                # format detected

Every writer checks everything (grid, group size, shapes the format can express) before it
writes, and writes atomically: a refused save leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from ..errors import FormatError
from .checkpoint import ModelFn
from .checkpoint import load as load_checkpoint
from .checkpoint import save as save_checkpoint

FORMATS = ("brainsurgeon", "hf", "compressed-tensors", "gptq", "gguf", "onnx")


def save(model: nn.Module, path: str, recipe: Any = None, plan: Any = None, history: Any = None, *,
         format: str = "brainsurgeon", **options: Any) -> str:
    """Write `model` to `path` in `format`; returns the path. `options` go to that format's writer.

    brainsurgeon/hf: recipe, plan, history (stored in the manifest). compressed-tensors/gptq/gguf:
    quant (the config the float Linears were quantized with), tokenizer, ignore, and the writer's
    own options. onnx: example_inputs (required) and the options of :func:`export_onnx`.

    >>> save(lm, "out/gptq", format="gptq", quant=bs.GPTQ(bits=4, group_size=128))
    'out/gptq'
    """
    if format not in FORMATS:
        raise FormatError(f"save: format={format!r}; allowed: {list(FORMATS)}")
    meta = {"recipe": recipe, "plan": plan, "history": history}
    if format in ("brainsurgeon", "hf"):
        if options:
            raise FormatError(f"save(format={format!r}) takes recipe/plan/history, not {sorted(options)}")
        if format == "hf":
            from .hf import save_pretrained

            return save_pretrained(model, path, **meta)
        return save_checkpoint(model, path, **meta)
    if any(v is not None for v in meta.values()):
        raise FormatError(f"save(format={format!r}) cannot store recipe/plan/history (the format has no place "
                          f"for them); save them with format='brainsurgeon' or report.save()")
    if format == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(model, path, **options)
    if format == "gptq":
        from .gptq import save_gptq

        return save_gptq(model, path, **options)
    if format == "gguf":
        from .gguf import save_gguf

        return save_gguf(model, path, **options)
    from .onnx_export import export_onnx

    if "example_inputs" not in options:
        raise FormatError("save(format='onnx') needs example_inputs=(x,): ONNX export traces one forward")
    export_onnx(model, options.pop("example_inputs"), path, **options)
    return path


def detect_format(path: str) -> str:
    """The format of a saved model at `path` (file or folder), from its contents.

    >>> detect_format("out/ct")
    'compressed-tensors'
    """
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"GGUF":
            return "gguf"
        if path.endswith(".onnx"):
            return "onnx"
        return "brainsurgeon"  # a pickle file: checkpoint.load refuses or reads it
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config") or {}
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method in ("compressed-tensors", "gptq"):
            return str(method)
        return "hf"
    return "brainsurgeon"


def load(path: str, model_fn: ModelFn | None = None, *, verify: bool = True, allow_pickle: bool = False) -> nn.Module:
    """Read a model saved in any format of :data:`FORMATS` (detected from the files).

    model_fn: builds the dense architecture; needed for ``brainsurgeon`` checkpoints of non-HF
    models, ignored by the self-describing formats (HF folders, compressed-tensors, GPTQ, GGUF).

    >>> model = load("out/ckpt", DigitsCNN); lm = load("out/ct"); lm = load("out/lm.gguf")
    """
    if not isinstance(path, (str, os.PathLike)):
        raise FormatError(f"load(): path must be the path of a checkpoint folder or file, got {path!r}")
    fmt = detect_format(path)
    if fmt == "compressed-tensors":
        from .compressed_tensors import load_compressed_tensors

        return load_compressed_tensors(path)
    if fmt == "gptq":
        from .gptq import load_gptq

        return load_gptq(path)
    if fmt == "gguf":
        from .gguf import load_gguf

        return load_gguf(path)
    if fmt == "onnx":
        raise FormatError(f"{path} is an ONNX graph; run it with onnxruntime.InferenceSession (brainsurgeon does "
                          f"not convert ONNX back to torch). Load the brainsurgeon checkpoint instead")
    if model_fn is None:
        if fmt == "hf":
            from .hf import from_pretrained

            return from_pretrained(path, verify=verify)
        from .manifest import MANIFEST, read_manifest

        if os.path.isfile(os.path.join(path, MANIFEST)) and read_manifest(path).get("hf_config"):
            return load_checkpoint(path, path, verify=verify)  # an HF model: its config is in the manifest
        raise FormatError(f"{path} is a brainsurgeon checkpoint of a non-HF model; pass model_fn (the model class "
                          f"or a function that builds the dense model): load(path, MyModel)")
    return load_checkpoint(path, model_fn, verify=verify, allow_pickle=allow_pickle)
