"""An undo log of a model's state, for restoring it in place after a failed in-place verb.

    >>> log = UndoLog(model)          # references only: no tensor is copied
    >>> try:
    ...     surgery_(model)
    ... except BaseException:
    ...     log.restore()             # same Parameter/Module objects, values, attributes and flags
    ...     raise
    >>> log.restore_flags()           # on success: every submodule's train/eval flag as before

Structural surgery replaces a tensor's ``.data`` (it never writes into the old storage), so keeping a
reference to every parameter's and buffer's ``.data`` is enough to put values back; plain attributes
(``out_channels``, ``num_heads``, a HF ``config``'s fields) are snapshotted shallowly and restored into
the same objects. Verbs that write into weights in place (OBS reconstruction) copy those tensors first
with :meth:`UndoLog.keep_values`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _plain(v: Any) -> bool:
    return not isinstance(v, (torch.Tensor, nn.Module))


class UndoLog:
    """Parameters, buffers, grads, plain attributes and train flags of every submodule of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], bool]] = []
        self.objects: dict[int, tuple[Any, dict[str, Any]]] = {}   # configs and other attribute objects
        for m in model.modules():
            params = {k: (p, None if p is None else p.data, None if p is None else p.grad)
                      for k, p in m._parameters.items()}
            bufs = {k: (b, None if b is None else b.data) for k, b in m._buffers.items()}
            attrs = {k: v if hasattr(v, "__dict__") else copy.copy(v)   # objects: the same object is put back
                     for k, v in vars(m).items() if not k.startswith("_") and _plain(v)}
            for v in vars(m).values():   # config objects (HF PretrainedConfig): surgery writes their fields
                if callable(getattr(v, "to_dict", None)) and _plain(v) and not isinstance(v, type) \
                        and id(v) not in self.objects:
                    self.objects[id(v)] = (v, {k: copy.copy(x) for k, x in vars(v).items()})
            self.modules.append((m, params, bufs, attrs, m.training))

    def keep_values(self, tensors: list[torch.Tensor]) -> None:
        """Copy the current values of ``tensors`` (they are about to be written in place)."""
        self.values = getattr(self, "values", []) + [(t, t.detach().clone()) for t in tensors]

    def restore(self) -> None:
        """Put every module back as it was when the log was made (same objects)."""
        for t, v in reversed(getattr(self, "values", [])):
            t.data.copy_(v) if t.data.shape == v.shape else setattr(t, "data", v)
        for m, params, bufs, attrs, training in self.modules:
            m._parameters.clear()
            for k, (p, data, grad) in params.items():
                if p is not None:
                    p.data, p.grad = data, grad
                m._parameters[k] = p
            m._buffers.clear()
            for k, (b, data) in bufs.items():
                if b is not None:
                    b.data = data
                m._buffers[k] = b
            for k, v in attrs.items():
                m.__dict__[k] = v
            m.training = training
        for obj, fields in self.objects.values():
            obj.__dict__.update(fields)
        for m, *_ in self.modules:
            if isinstance(m, nn.RNNBase) and hasattr(m, "_init_flat_weights"):
                m._init_flat_weights()

    def restore_flags(self) -> None:
        """Every submodule's train/eval flag as when the log was made."""
        for m, *_, training in self.modules:
            m.training = training
