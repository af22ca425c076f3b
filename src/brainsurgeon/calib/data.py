"""Calibration data: turn whatever the user passes into ``(args, kwargs)`` for ``model(*args, **kwargs)``.

Accepted calibration data (``calib``):

* a ``torch.utils.data.DataLoader`` or any iterable of batches (a list, a generator),
* a zero-argument callable returning such an iterable (called once per pass),
* a single Tensor or dict (one batch).

Each batch may be a Tensor (``args=(t,)``), a tuple/list whose first element is the input
(labels and the rest are ignored) or a dict of keyword arguments (the key ``"labels"`` is
dropped)::

    >>> batches = [torch.randn(4, 8), (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))]
    >>> for args, kwargs in iter_batches(batches):
    ...     y = model(*args, **kwargs)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._modes import eval_mode
from ..errors import CalibrationError
from .padding import batch_index, record_mask, token_masks

Batch = tuple[tuple[Any, ...], dict[str, Any]]

_EMPTY = ("calibration data is empty; pass a DataLoader, a list of tensors or a callable that returns "
          "an iterable of batches (each a Tensor, an (input, label) tuple or a dict of model kwargs)")


class CachedBatches(list):
    """Batches already converted to ``(args, kwargs)``; :func:`iter_batches` yields them as they are.

    Made by :func:`cache_batches`; a plain list subclass, so ``len`` and indexing work::

        >>> cached = cache_batches(iter(loader), max_batches=8)
        >>> args, kwargs = cached[0]
    """


class MappedBatches:
    """Batches of `source` converted to ``(args, kwargs)`` and passed through `fn`, on every pass.

    Made by :func:`prepare_calibration` (e.g. to cast float batches to the model's dtype);
    :func:`iter_batches` yields them as they are::

        >>> cast = MappedBatches(loader, lambda b: cast_floats(b, torch.bfloat16))
    """

    def __init__(self, source: Any, fn: Any) -> None:
        self.source, self.fn = source, fn

    def __iter__(self) -> Iterator[Batch]:
        return (self.fn(b) for b in iter_batches(self.source))


def to_args_kwargs(batch: Any, index: int = 0) -> Batch:
    """Convert one batch to ``(args, kwargs)``.

    >>> to_args_kwargs((torch.ones(2, 3), torch.zeros(2)))[0][0].shape
    torch.Size([2, 3])
    >>> to_args_kwargs({"input_ids": ids, "labels": ids})[1].keys()
    dict_keys(['input_ids'])
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise CalibrationError(f"calibration batch {index} is an empty {type(batch).__name__}; "
                                   f"each batch must be a Tensor, an (input, label) tuple or a dict")
        return to_args_kwargs(batch[0], index)
    raise CalibrationError(f"calibration batch {index} has unsupported type {type(batch).__name__}; "
                           f"each batch must be a Tensor, an (input, label) tuple/list or a dict of "
                           f"model keyword arguments (e.g. a tokenizer's output)")


def _source(calib: Any) -> Iterable[Any]:
    if calib is None:
        raise CalibrationError(_EMPTY + " (got calib=None)")
    if isinstance(calib, (torch.Tensor, Mapping)):
        return [calib]
    if callable(calib) and not isinstance(calib, Iterable):
        calib = calib()
    if not isinstance(calib, Iterable):
        raise CalibrationError(f"calibration data of type {type(calib).__name__} is not iterable; "
                               f"pass a DataLoader, a list of tensors or a callable returning one")
    return calib


def iter_batches(calib: Any, max_batches: int = 0) -> Iterator[Batch]:
    """Yield ``(args, kwargs)`` for each calibration batch (at most `max_batches`; 0 = all).

    Raises :class:`CalibrationError` when there is no batch at all or a batch has an
    unsupported type.

    >>> for args, kwargs in iter_batches(loader, max_batches=16):
    ...     model(*args, **kwargs)
    """
    count = 0
    converted = isinstance(calib, CachedBatches | MappedBatches)
    source: Iterable[Any] = calib if converted else _source(calib)
    for i, batch in enumerate(source):
        if max_batches and i >= max_batches:
            break
        yield batch if converted else to_args_kwargs(batch, i)
        count += 1
    if count == 0:
        raise CalibrationError(_EMPTY)


def is_one_shot(calib: Any) -> bool:
    """Whether `calib` can be iterated only once (an iterator or generator, not a list/DataLoader).

    >>> is_one_shot([torch.ones(1)]), is_one_shot(iter([torch.ones(1)]))
    (False, True)
    """
    return isinstance(calib, Iterator)


def cache_batches(calib: Any, max_batches: int = 0) -> CachedBatches:
    """Read the calibration data once and keep the converted batches (for multi-pass drivers).

    >>> cached = cache_batches((x for x in tensors), max_batches=4)
    >>> len(cached)
    4
    """
    if isinstance(calib, CachedBatches):
        return CachedBatches(calib[:max_batches] if max_batches else calib)
    return CachedBatches(iter_batches(calib, max_batches))


def move_to(obj: Any, device: torch.device | str | None) -> Any:
    """Move every tensor in nested tuples/lists/dicts to `device` (other values are kept).

    >>> args, kwargs = move_to(((x,), {"mask": m}), "cuda")
    """
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor found in nested tuples/lists/dicts, or None.

    >>> first_tensor(((), {"input_ids": ids})) is ids
    True
    """
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model without tensors.

    >>> model_device(nn.Linear(2, 2))
    device(type='cpu')
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def eval_forwards(model: nn.Module, calib: Any, max_batches: int = 0, each: Callable[[], Any] | None = None) -> int:
    """Run `model` in eval mode, without gradients, on every calibration batch (for the hooks a caller
    installed), then give every submodule its train/eval flag back; `each()` runs before each batch.
    Returns the number of batches.

    Each batch's 2-D ``attention_mask`` is recorded as the driver records it (:mod:`~brainsurgeon.calib.padding`):
    Hessian accumulators keep only the real tokens' rows, and observers of (B, T, C) inputs drop the padding
    rows with :func:`~brainsurgeon.calib.padding.real_rows`, so padding reaches no statistic.

    >>> eval_forwards(model, calib, each=seen.clear)
    """
    dev, n = model_device(model), 0
    with eval_mode(model), torch.no_grad(), token_masks() as masks:
        for i, (args, kwargs) in enumerate(iter_batches(calib, max_batches)):
            if each is not None:
                each()
            record_mask(masks, i, kwargs)
            with batch_index(i):
                model(*move_to(args, dev), **move_to(kwargs, dev))
            n += 1
    return n


def relocate_(module: nn.Module, device: torch.device | str, skip: str = "") -> list[tuple[Any, ...]]:
    """Move `module`'s parameters and buffers to `device` in place; returns what :func:`restore_` needs.

    Parameters keep their identity (only ``.data`` moves), so tied weights stay tied and
    optimizers/hooks keep working. Submodules whose qualified name starts with `skip` are left.

    >>> undo = relocate_(model.layers[3], "cuda")
    >>> restore_(undo)          # back where each tensor was
    """
    undo: list[tuple[Any, ...]] = []
    seen: set[int] = set()
    for mname, mod in module.named_modules():
        if skip and (mname == skip or mname.startswith(skip + ".")):
            continue
        for p in mod._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.device != torch.device(device):
                undo.append(("param", p, p.device))
                p.data = p.data.to(device)
        for bname, b in mod._buffers.items():
            if b is not None and b.device != torch.device(device):
                undo.append(("buffer", mod, bname, b.device))
                mod._buffers[bname] = b.to(device)
    return undo


def restore_(undo: list[tuple[Any, ...]]) -> None:
    """Undo :func:`relocate_` (moves every tensor back to its original device).

    >>> restore_(relocate_(block, "cuda"))
    """
    for item in reversed(undo):
        if item[0] == "param":
            _, p, dev = item
            p.data = p.data.to(dev)
        else:
            _, mod, bname, dev = item
            mod._buffers[bname] = mod._buffers[bname].to(dev)


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor in nested tuples/lists/dicts to `dtype` (others are kept).

    >>> cast_floats(((x16, ids), {}), torch.float32)      # x16 -> float32, integer ids unchanged
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if torch.is_floating_point(obj) and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return tuple(cast_floats(v, dtype) for v in obj)
    if isinstance(obj, list):
        return [cast_floats(v, dtype) for v in obj]
    if isinstance(obj, Mapping):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for v in values for t in _tensors(v)]


def describe_batch(batch: Batch) -> str:
    """Shapes, dtypes and devices of a batch's tensors, for error messages.

    >>> describe_batch(((torch.ones(2, 3),), {}))
    '[(2, 3) float32 cpu]'
    """
    ts = _tensors(batch)
    parts = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device}" for t in ts[:4]]
    return "[" + ", ".join(parts) + (", ..." if len(ts) > 4 else "") + "]"


def _expects(model: nn.Module) -> str:
    """What the model's first weight layer takes, for error messages (e.g. 'conv1: Conv2d with 3 input channels')."""
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or not name:
            continue
        dt = f"{str(w.dtype).replace('torch.', '')} on {w.device}"
        if isinstance(m, nn.modules.conv._ConvNd):
            return f"its first layer {name} is a {type(m).__name__} with {m.in_channels} input channels ({dt})"
        if isinstance(m, nn.Linear):
            return f"its first layer {name} is a Linear with {m.in_features} input features ({dt})"
        if isinstance(m, nn.Embedding):
            return f"its first layer {name} is an Embedding of {m.num_embeddings} token ids ({dt})"
        return f"its first layer {name} is a {type(m).__name__} ({dt})"
    return "it has no weight layer"


class _StopProbe(Exception):
    """Ends the probe forward after the first compressed layer ran (never escapes)."""


def prepare_calibration(model: nn.Module, calib: Any, verb: str, *, max_batches: int = 0,
                        stop_after: list[nn.Module] | None = None) -> tuple[Any, list[str]]:
    """Check calibration data against the model BEFORE any work; return it ready to use, with notes.

    * a one-shot iterator/generator is read once and kept (every later pass - Hessians, BatchNorm
      re-estimation, mean/std correction, the next recipe step - reads the same batches);
    * floating-point batches in another dtype than the model are cast to the model's dtype;
    * the first batch is run through the model (up to the first layer of `stop_after`, if given,
      else the whole forward): if the forward fails, a :class:`CalibrationError` names the verb, the
      batch's shapes/dtypes/devices, what the model's first layer expects, the original error, and the fix.

    >>> calib, notes = prepare_calibration(model, (b for b in batches), "sparsify_")
    """
    notes: list[str] = []
    if is_one_shot(calib):
        calib = cache_batches(calib, max_batches)
        notes.append(f"calibration data is a one-shot iterator: its {len(calib)} batches were read once and "
                     f"kept in memory, since the run reads them more than once (pass a list or a DataLoader "
                     f"to avoid the copy)")
    first = next(iter(iter_batches(calib, 1)))  # raises CalibrationError when empty
    dtype = next((p.dtype for p in model.parameters() if torch.is_floating_point(p)), None)
    floats = [t for t in _tensors(first) if torch.is_floating_point(t)]
    if dtype is not None and any(t.dtype != dtype for t in floats):
        got = sorted({str(t.dtype).replace("torch.", "") for t in floats if t.dtype != dtype})
        calib = MappedBatches(calib, lambda b, d=dtype: cast_floats(b, d))
        notes.append(f"calibration batches are {', '.join(got)} but the model is "
                     f"{str(dtype).replace('torch.', '')}: cast to the model's dtype (pass batches in the "
                     f"model's dtype, e.g. x.to({dtype}), to avoid the copy)")
        first = cast_floats(first, dtype)
    if any(p.is_meta for p in model.parameters()):
        from ..errors import UnsupportedModuleError

        meta = [n for n, p in model.named_parameters() if p.is_meta][:3]
        raise UnsupportedModuleError(f"{verb}: the model's weights are on the meta device ({meta}...): they hold "
                                     f"no values to compress. Load the weights first (e.g. "
                                     f"model.to_empty(device='cpu') then load_state_dict, or from_pretrained)")
    _probe(model, first, verb, stop_after)
    return calib, notes


def check_first_batch(model: nn.Module, data: Any, verb: str) -> None:
    """Run the first batch of `data` through the model and wrap a failure like :func:`prepare_calibration`,
    without changing `data` (for training data whose labels the caller needs). One-shot iterators are
    not probed (that would consume a batch).

    >>> check_first_batch(model, train_loader, "share_")
    """
    if is_one_shot(data):
        return
    first = next(iter(iter_batches(data, 1)))
    dtype = next((p.dtype for p in model.parameters() if torch.is_floating_point(p)), None)
    _probe(model, cast_floats(first, dtype) if dtype is not None else first, verb, None)


def _probe(model: nn.Module, batch: Batch, verb: str, stop_after: list[nn.Module] | None) -> None:
    """Run one batch (to the first of `stop_after`); wrap a failure in a CalibrationError with the fix."""
    from ..errors import BrainsurgeonError

    dev = model_device(model)
    args, kwargs = move_to(batch, dev)
    handles = []

    def stop(*_: Any) -> None:
        raise _StopProbe

    try:
        for m in stop_after or []:
            handles.append(m.register_forward_hook(stop))
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except _StopProbe:
        pass
    except BrainsurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's forward failed on this data: say where and how to fix
        raise CalibrationError(
            f"{verb}: the model's forward failed on the first calibration batch {describe_batch(batch)}; "
            f"{_expects(model)}. {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}. Fix the "
            f"calibration data to match the model's input (shape, channel count, dtype, device), e.g. "
            f"batches of shape (N, C, H, W) for a CNN or a tokenizer's dict for a transformer") from e
    finally:
        for h in handles:
            h.remove()
