"""Save, load and export compressed models: safetensors + JSON manifest, HF round trip, ONNX.

    >>> from brainsurgeon.export import save, load, export_onnx
    >>> save(model, "out/ckpt", recipe=recipe)
    >>> model = load("out/ckpt", DigitsCNN)
    >>> export_onnx(model, (x,), "out/model.onnx")      # checked with onnxruntime
    >>> export_static_qdq(w8a8_model, (x,), "out/int8.onnx", calib=batches)  # QLinearConv in onnxruntime
    >>> save(lm, "out/ct", format="compressed-tensors", quant=GPTQ(bits=4, group_size=128))  # or gptq, gguf

No pickles are written or (by default) read. transformers/onnx are imported only when used.
"""

from .formats_io import FORMATS, detect_format, load, save
from .hf import from_pretrained, save_pretrained
from .manifest import read_manifest
from .onnx_export import OnnxExport, export_onnx
from .qdq_static import export_static_qdq
from .specs import build_module, module_spec

__all__ = ["FORMATS", "OnnxExport", "build_module", "detect_format", "export_onnx", "export_static_qdq",
           "from_pretrained", "load", "module_spec", "read_manifest", "save", "save_pretrained"]
