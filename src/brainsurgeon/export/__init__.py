"""Save, load and export compressed models: safetensors + JSON manifest, HF round trip, ONNX.

    >>> from brainsurgeon.export import save, load, export_onnx
    >>> save(model, "out/ckpt", recipe=recipe)
    >>> model = load("out/ckpt", DigitsCNN)
    >>> export_onnx(model, (x,), "out/model.onnx")      # checked with onnxruntime

No pickles are written or (by default) read. transformers/onnx are imported only when used.
"""

from .checkpoint import load, save
from .hf import from_pretrained, save_pretrained
from .manifest import read_manifest
from .onnx_export import OnnxExport, export_onnx
from .specs import build_module, module_spec

__all__ = ["OnnxExport", "build_module", "export_onnx", "from_pretrained", "load", "module_spec", "read_manifest",
           "save", "save_pretrained"]
