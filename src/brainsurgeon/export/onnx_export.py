"""ONNX export of compressed models, checked against torch with onnxruntime before the file appears.

Structurally pruned models are plain smaller modules and export as they are, low-rank factors as
their two smaller layers. Registered compressed formats that run custom kernels (packed int8/int4,
dynamic int8, CSR/BSR sparse) are replaced first: by their dense equivalent (``quantized=
"dequantize"``, from ``dequantize()``/``to_dense()``/``dense_weight()``) or, for packed integer
weights, by integer codes + a dequantize in the graph (``quantized="qdq"``, weight-only QDQ).

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
from .qdq import qdq_equivalent

log = get_logger(__name__)


@dataclass
class OnnxExport:
    """Where the model went and how closely onnxruntime reproduces torch on the example inputs."""

    path: str
    max_abs_diff: float
    opset: int | None
    seconds: float
    dequantized: list[str] = field(default_factory=list)  # modules exported as dense float layers
    qdq: list[str] = field(default_factory=list)  # modules exported as integer codes + dequantize
    # max |ONNX - original compressed model| when modules were dequantized (their kernels round
    # activations, e.g. to bfloat16, so this is larger than max_abs_diff; informational)
    diff_vs_compressed: float | None = None


def _dense_equivalent(m: nn.Module) -> nn.Module | None:
    """A plain Linear/ConvNd computing what `m` computes, from its dequantized/dense weight; None if unknown."""
    fn = next((getattr(m, a) for a in ("dequantize", "to_dense", "dense_weight") if callable(getattr(m, a, None))),
              None)
    if fn is None:
        return None
    out = fn()
    if isinstance(out, nn.Module) or not isinstance(out, torch.Tensor):
        return out if isinstance(out, nn.Module) else None
    W = out.detach()
    bias = getattr(m, "bias", None)
    if W.dim() == 2 and hasattr(m, "in_features"):
        dense: nn.Module = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
    elif W.dim() in (3, 4, 5) and hasattr(m, "in_channels"):
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[W.dim()]
        pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        dense = conv(m.in_channels, W.shape[0], tuple(W.shape[2:]), stride=tuple(m.stride), padding=pad,
                     dilation=tuple(m.dilation), groups=m.groups, bias=bias is not None, device=W.device,
                     dtype=W.dtype)
    else:
        return None
    with torch.no_grad():
        dense.weight.copy_(W)
        if bias is not None:
            dense.bias.copy_(bias.detach())
    return dense


def densify(model: nn.Module, qdq: bool = False) -> tuple[nn.Module, list[str], list[str]]:
    """A copy of `model` where each compressed leaf module (a registered format without child modules:
    packed int8/int4, dynamic int8, sparse storage) is replaced by plain torch ops: with `qdq`, packed
    integer weights by :class:`~brainsurgeon.export.qdq.WeightOnlyQDQ` (integer codes + dequantize),
    everything else by its dense Linear/Conv equivalent. Formats built from child modules (low-rank
    factors) stay: they export as their smaller layers. Returns (copy, dequantized names, QDQ names).

    >>> dense, dequantized, qdq = densify(packed_model)
    """
    model = copy.deepcopy(model)
    dequantized: list[str] = []
    qdq_names: list[str] = []
    for name, m in list(model.named_modules()):
        if qdq and name and callable(getattr(m, "qdq_module", None)):  # static int8 activations + weights
            new_qdq = m.qdq_module()
            if new_qdq is not None:
                model.set_submodule(name, new_qdq.train(m.training))
                qdq_names.append(name)
                continue
        if not name or getattr(type(m), "format_name", None) is None or next(m.children(), None) is not None:
            continue
        new = qdq_equivalent(m) if qdq else None
        (qdq_names if new is not None else dequantized).append(name)
        new = new if new is not None else _dense_equivalent(m)
        if new is not None:
            model.set_submodule(name, new.train(m.training))
        else:
            dequantized.remove(name)
            log.warning("%s (%s): no dense equivalent; exporting its forward as is", name, type(m).__name__)
    return model, dequantized, qdq_names


def _eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


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
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: onnxruntime's own warnings go straight to stderr
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(tensors):
        raise FormatError(f"{path} expects {len(names)} inputs {names} but {len(tensors)} example tensors were "
                          f"given; pass exactly the tensors the model's forward takes")
    return sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)})


def export_onnx(model: nn.Module, example_inputs: Any, path: str, *, opset: int | None = None,
                atol: float = 1e-4, check: bool = True, dynamo: bool = True, quantized: str = "dequantize",
                optimize: bool = True, dynamic_shapes: Any = None) -> OnnxExport:
    """Export `model` (a copy, in eval mode) to `path`; with `check`, onnxruntime must match torch within `atol`.

    quantized: how packed/sparse modules (custom kernels ONNX cannot express) are exported:
    "dequantize" (dense float Linear/Conv), "qdq" (integer codes as INT8 initializers + Cast/Add/Mul,
    ~4x smaller for the weights; turns the graph optimizer off, which would fold them back to
    float), or "as_is" (every module's own forward; for formats that dequantize with plain ops).
    optimize: run the dynamo exporter's graph optimizer (constant folding; slow on large graphs;
    onnxruntime optimizes the graph again when it loads it).
    dynamic_shapes: passed to ``torch.onnx.export`` (dynamo), e.g. ``({0: "batch"},)`` for a
    variable batch size of the first input.

    The file is written beside `path` and renamed into place only after the check passes; on any
    failure nothing is left at `path` and `model` is untouched. Returns an :class:`OnnxExport`.

    >>> export_onnx(pruned, (x,), "out/pruned.onnx").max_abs_diff
    3.7e-08
    """
    if atol <= 0:
        raise FormatError(f"atol must be > 0, got {atol}; the default 1e-4 suits float32 models")
    inputs = _as_tuple(example_inputs)
    if quantized not in ("dequantize", "qdq", "as_is"):
        raise FormatError(f"quantized={quantized!r}; allowed: 'dequantize', 'qdq', 'as_is'")
    if quantized == "as_is":
        work, dequantized, qdq = copy.deepcopy(model), [], []
    else:
        work, dequantized, qdq = densify(model, qdq=quantized == "qdq")
    optimize = optimize and not qdq
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
                    kw.update(verbose=False, optimize=optimize, dynamic_shapes=dynamic_shapes)
                torch.onnx.export(work, inputs, tmp, **kw)
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types; name the model and the fix
            raise UnsupportedOpError(
                f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {str(e)[:500]}. "
                f"Compressed modules with custom kernels need a dequantize()/to_dense() method to export; "
                f"try dynamo={not dynamo}") from e
        diff, diff_orig = 0.0, None
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
            if dequantized or qdq:
                with torch.no_grad():
                    orig = _leaves(model(*inputs)) if not model.training else _leaves(_eval_copy(model)(*inputs))
                diff_orig = max(float((torch.from_numpy(g).float() - r.detach().float().cpu()).abs().max())
                                for g, r in zip(got, orig, strict=True))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        for extra in (tmp + ".data",):
            if os.path.exists(extra):
                os.unlink(extra)
    res = OnnxExport(path=path, max_abs_diff=diff, opset=opset, seconds=time.perf_counter() - t0,
                     dequantized=dequantized, qdq=qdq, diff_vs_compressed=diff_orig)
    log.info("exported %s to %s (max |diff| %.3g, %d modules dequantized, %d as QDQ)", type(model).__name__, path,
             diff, len(dequantized), len(qdq))
    return res
