"""ONNX export of compressed models, checked against torch with onnxruntime before the file appears.

Structurally pruned models are plain smaller modules and export as they are. Registered compressed
formats that run custom kernels export through their dense equivalent when they offer one
(``dequantize()`` or ``to_dense()`` returning an ``nn.Module``); formats whose forward is plain
torch ops (int8 storage + scale, dequantized on the fly) export as they are, i.e. as integer
initializers followed by Cast/Mul (weight-only QDQ).

    >>> res = export_onnx(model, (torch.randn(1, 1, 8, 8),), "out/model.onnx")
    >>> res.max_abs_diff <= 1e-4
    True
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..errors import FormatError, UnsupportedOpError

log = get_logger(__name__)


@dataclass
class OnnxExport:
    """Where the model went and how closely onnxruntime reproduces torch on the example inputs."""

    path: str
    max_abs_diff: float
    opset: int | None
    seconds: float
    dequantized: list[str] = field(default_factory=list)


def densify(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of `model` with every compressed module that offers a dense equivalent replaced by it.

    >>> dense, names = densify(packed_model)       # names: the modules that were dequantized
    """
    model = copy.deepcopy(model)
    names: list[str] = []
    for name, m in list(model.named_modules()):
        if not name or getattr(type(m), "format_name", None) is None:
            continue
        fn = getattr(m, "dequantize", None) or getattr(m, "to_dense", None)
        if callable(fn):
            dense = fn()
            if isinstance(dense, nn.Module):
                model.set_submodule(name, dense.train(m.training))
                names.append(name)
    return model, names


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # HF ModelOutput
        out = out.to_tuple()
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run_onnxruntime(path: str, inputs: tuple[Any, ...]) -> list[Any]:
    """Run the ONNX file on CPU with onnxruntime; inputs are matched to graph inputs in order."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise FormatError("checking an ONNX export needs onnxruntime; pip install 'brainsurgeon[onnx]' "
                          "or pass check=False") from e
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(tensors):
        raise FormatError(f"{path} expects {len(names)} inputs {names} but {len(tensors)} example tensors were "
                          f"given; pass exactly the tensors the model's forward takes")
    return sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)})


def export_onnx(model: nn.Module, example_inputs: Any, path: str, *, opset: int | None = None,
                atol: float = 1e-4, check: bool = True, dynamo: bool = True) -> OnnxExport:
    """Export `model` (a copy, in eval mode) to `path`; with `check`, onnxruntime must match torch within `atol`.

    The file is written beside `path` and renamed into place only after the check passes; on any
    failure nothing is left at `path` and `model` is untouched. Returns an :class:`OnnxExport`.

    >>> export_onnx(pruned, (x,), "out/pruned.onnx").max_abs_diff
    3.7e-08
    """
    if atol <= 0:
        raise FormatError(f"atol must be > 0, got {atol}; the default 1e-4 suits float32 models")
    inputs = _as_tuple(example_inputs)
    work, dequantized = densify(model)
    work.eval()
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            ref = _leaves(work(*inputs))
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stdout(quiet):  # the dynamo exporter reports progress on stdout
                kw: dict[str, Any] = {"dynamo": dynamo, "opset_version": opset, "external_data": False}
                if dynamo:
                    kw["verbose"] = False
                torch.onnx.export(work, inputs, tmp, **kw)
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types; name the model and the fix
            raise UnsupportedOpError(
                f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {str(e)[:500]}. "
                f"Compressed modules with custom kernels need a dequantize()/to_dense() method to export; "
                f"try dynamo={not dynamo}") from e
        diff = 0.0
        if check:
            got = run_onnxruntime(tmp, inputs)
            if len(got) != len(ref):
                raise FormatError(f"ONNX model {path} returns {len(got)} outputs, torch returns {len(ref)}")
            for i, (g, r) in enumerate(zip(got, ref, strict=True)):
                r = r.detach().float().cpu()
                if tuple(g.shape) != tuple(r.shape):
                    raise FormatError(f"ONNX output {i} of {path} has shape {tuple(g.shape)}, torch {tuple(r.shape)}")
                diff = max(diff, float((torch.from_numpy(g).float() - r).abs().max()) if r.numel() else 0.0)
            if not diff <= atol:
                raise FormatError(f"ONNX export of {type(model).__name__} differs from torch by {diff:.3g} > atol "
                                  f"{atol:g} on the example inputs; the file was not written. Report the model, "
                                  f"or export with dynamo={not dynamo}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        for extra in (tmp + ".data",):
            if os.path.exists(extra):
                os.unlink(extra)
    res = OnnxExport(path=path, max_abs_diff=diff, opset=opset, seconds=time.perf_counter() - t0,
                     dequantized=dequantized)
    log.info("exported %s to %s (max |diff| %.3g, %d modules dequantized)", type(model).__name__, path, diff,
             len(dequantized))
    return res
