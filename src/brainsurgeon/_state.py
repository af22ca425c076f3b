"""Snapshot a model and restore it in place: the rollback of every verb that fails midway.

Object identity is part of the model the caller holds: an optimizer built before the call
holds the Parameter objects, hooks and user references hold Module objects. So a rollback puts
the same objects back where they were and puts the saved values back into them; it never swaps a
module's ``__dict__`` for a deep copy's.

Copy-on-write: the snapshot keeps references, not copies. A verb that gives a tensor new storage
(``t.data = new``, what structural surgery and :meth:`ModelSnapshot.write_` do) leaves the old
storage untouched, and the rollback puts that storage back. A verb that writes INTO a tensor's
storage calls :meth:`ModelSnapshot.keep` first (or :meth:`ModelSnapshot.keep_all` before code
that may write anywhere, e.g. training); only those tensors are copied, once each.

    >>> snap = ModelSnapshot(model)         # references only: no tensor is copied
    >>> try:
    ...     snap.write_(model.fc.weight, W_hat)   # new storage, or a kept copy + in-place write
    ...     snap.keep([model.bn.running_mean]); change_in_place(model.bn)
    ... except BaseException:
    ...     snap.restore_()
    ...     raise
    >>> snap.restore_flags()                # on success: every submodule's train/eval flag as before

What is restored: every module's class, attributes (``training``, ``stride``, ...), the
contents of its ``_parameters``/``_buffers``/``_modules`` and hook dicts (same dict objects), the
fields of config objects it holds (an HF ``model.config`` that a pruning step narrowed);
every Parameter and buffer keeps its object, its storage when it had one, its values,
``requires_grad`` and ``.grad`` (same grad tensor, same values).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_CONTAINERS = (dict, list, set)
# exact types that never hold a config object (no ``to_dict``): skipped by the config scan of every attribute
_NO_CONFIG = frozenset((bool, int, float, str, type(None), dict, list, set, tuple, torch.Tensor, nn.Parameter))
_PLAIN = frozenset((bool, int, float, str, type(None), tuple))   # exact types kept by reference, not configs
_EMPTY = ()   # the saved content of an empty container (restored by clearing it: nothing to copy)


_ATOMS = frozenset((bool, int, float, complex, str, bytes, type(None)))


def _deepcopy_fields(obj: Any) -> dict[str, Any]:
    """``copy.deepcopy(vars(obj))``, equal to it (one memo, so aliasing between fields is kept), without
    deepcopy's per-value dispatch for the scalars that make up most of a config (deepcopy returns them as
    they are)."""
    memo: dict[int, Any] = {}
    return {k: v if type(v) in _ATOMS else copy.deepcopy(v, memo) for k, v in vars(obj).items()}


def _shallow(v: Any) -> Any:
    return type(v)(v.items()) if isinstance(v, dict) else type(v)(v)


def _storage(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.untyped_storage().data_ptr()


class ModelSnapshot:
    """Everything needed to put `model` back as it is now, with the same objects.

    Values are copied only by :meth:`keep` (on their device; `to_cpu=True` keeps the copies on
    the CPU, and :meth:`write_` then writes accelerator tensors in place instead of holding two
    storages there).
    """

    def __init__(self, model: nn.Module, *, to_cpu: bool = False) -> None:
        self.to_cpu = to_cpu
        self.modules: list[tuple[nn.Module, type, dict[str, tuple[Any, Any]]]] = []
        self.configs: dict[int, tuple[Any, dict[str, Any]]] = {}  # HF-style config objects, edited in place
        tensors: dict[int, torch.Tensor] = {}
        from collections import OrderedDict
        no_config = _NO_CONFIG | {OrderedDict}
        for mod in model.modules():
            attrs = {}
            for k, v in vars(mod).items():
                tv = type(v)
                if tv in _PLAIN:   # most attributes (flags, sizes, names): kept as they are, never a config
                    attrs[k] = (v, None)
                    continue
                if tv is OrderedDict or tv is dict:   # _parameters, _modules, hook dicts: contents copied
                    attrs[k] = (v, _shallow(v) if v else _EMPTY)
                    continue
                if isinstance(v, _CONTAINERS):
                    attrs[k] = (v, _shallow(v) if v else _EMPTY)
                else:
                    attrs[k] = (v, None)
                if type(v) not in no_config and callable(getattr(v, "to_dict", None)) and hasattr(v, "__dict__") \
                        and not isinstance(v, nn.Module):
                    self.configs.setdefault(id(v), (v, _deepcopy_fields(v)))
            self.modules.append((mod, type(mod), attrs))
            for store in (mod._parameters, mod._buffers):
                for t in store.values():
                    if t is not None:
                        tensors.setdefault(id(t), t)
        # id -> [tensor, alias (keeps the original storage alive), kept value or None, requires_grad, grad]
        self.tensors: dict[int, list[Any]] = {}
        with torch.no_grad():
            for i, t in tensors.items():
                g = t.grad
                grad = None if g is None else (g, g.detach().clone())
                self.tensors[i] = [t, t.detach(), None, t.requires_grad, grad]
        self._shared_ptrs: set[int] | None = None   # found at the first write_ (plain pruning never asks)

    @property
    def _shared(self) -> set[int]:
        """Storages behind two tensors of the model at snapshot time (ties), from the kept aliases."""
        if self._shared_ptrs is None:
            counts: dict[int, int] = {}
            for entry in self.tensors.values():
                ptr = _storage(entry[1])
                counts[ptr] = counts.get(ptr, 0) + 1
            self._shared_ptrs = {s for s, n in counts.items() if s and n > 1}
        return self._shared_ptrs

    def keep(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the snapshot-time values of `tensors` before they are written in place (once each).

        A tensor that already got new storage needs no copy (its original storage is untouched);
        tensors created after the snapshot are ignored (the rollback removes them).
        """
        with torch.no_grad():
            for t in tensors:
                entry = self.tensors.get(id(t))
                if entry is None or entry[2] is not None or entry[1].is_meta:
                    continue
                alias = entry[1]
                if t.is_meta or _storage(t) != _storage(alias):
                    continue
                entry[2] = alias.to("cpu", copy=True) if self.to_cpu else alias.clone()

    def keep_all(self) -> ModelSnapshot:
        """Copy every tensor's values (before code that may write anywhere in place: training, re-estimation)."""
        self.keep([e[0] for e in self.tensors.values()])
        return self

    def write_(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Set `t`'s values to `value` (same shape), restorable by :meth:`restore_` at the least cost.

        The tensor gets `value` as its new storage (no copy; the snapshot holds the old one) unless
        its storage is shared with another tensor of the model (a tie that a new storage would break)
        or it lives on an accelerator with ``to_cpu=True``: then its values are kept and it is written
        in place.
        """
        value = value.detach().reshape(t.shape).to(dtype=t.dtype, device=t.device)
        with torch.no_grad():
            if (id(t) not in self.tensors or t.is_meta or _storage(t) in self._shared or value.layout != t.layout
                    or value.stride() != t.stride() or (self.to_cpu and t.device.type != "cpu")):
                self.keep([t])
                t.copy_(value)
            elif value.untyped_storage().nbytes() == value.numel() * value.element_size():
                t.data = value
            else:  # a view of a larger buffer: a compact copy, not the whole buffer kept alive
                t.data = value.clone()

    def restore_(self) -> None:
        """Put every module, attribute, Parameter, buffer, value, flag and grad back (same objects)."""
        for obj, saved in self.configs.values():  # e.g. model.config.intermediate_size after a pruning step
            vars(obj).clear()
            vars(obj).update(copy.deepcopy(saved))
        for mod, cls, attrs in self.modules:
            if type(mod) is not cls:
                mod.__class__ = cls
            d = vars(mod)
            for k in [k for k in d if k not in attrs]:
                del d[k]
            for k, (v, content) in attrs.items():
                if content is not None:
                    v.clear()
                    if content:
                        v.update(content) if isinstance(v, (dict, set)) else v.extend(content)
                d[k] = v
        with torch.no_grad():
            for t, alias, value, requires_grad, grad in self.tensors.values():
                if t.is_meta or alias.is_meta:
                    continue
                if (t.data_ptr() != alias.data_ptr() or t.shape != alias.shape or t.dtype != alias.dtype
                        or t.stride() != alias.stride()):
                    t.data = alias  # the verb replaced .data: give the tensor its own storage back
                if value is not None:
                    alias.copy_(value)
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
                if grad is None:
                    t.grad = None
                else:
                    g, gv = grad
                    g.copy_(gv)
                    t.grad = g
        for mod, *_ in self.modules:
            if isinstance(mod, nn.RNNBase) and hasattr(mod, "_init_flat_weights"):
                mod._init_flat_weights()  # cuDNN's flat weight views point at the restored storages

    def restore_flags(self) -> None:
        """Every submodule's train/eval flag as when the snapshot was made (after a verb that succeeded)."""
        for mod, _, attrs in self.modules:
            if "training" in attrs and mod.training != attrs["training"][0]:   # only where it changed
                mod.training = attrs["training"][0]

