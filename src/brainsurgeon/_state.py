"""Snapshot a model and restore it in place: the rollback of every verb that fails midway.

Object identity is part of the model the caller holds: an optimizer built before the call
holds the Parameter objects, hooks and user references hold Module objects. So a rollback puts
the same objects back where they were and copies the saved values into them; it never swaps a
module's ``__dict__`` for a deep copy's.

    >>> snap = ModelSnapshot(model)
    >>> try:
    ...     change(model)
    ... except BaseException:
    ...     snap.restore_()
    ...     raise

What is restored: every module's class, attributes (``training``, ``stride``, ...), the
contents of its ``_parameters``/``_buffers``/``_modules`` and hook dicts (same dict objects), the
fields of config objects it holds (an HF ``model.config`` that a pruning step narrowed);
every Parameter and buffer keeps its object, its storage when it had one, its values,
``requires_grad`` and ``.grad`` (same grad tensor, same values).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

_CONTAINERS = (dict, list, set)


def _shallow(v: Any) -> Any:
    return type(v)(v.items()) if isinstance(v, dict) else type(v)(v)


class ModelSnapshot:
    """Everything needed to put `model` back as it is now, with the same objects.

    Values are cloned (on their device; `to_cpu=True` keeps the clones on the CPU).
    """

    def __init__(self, model: nn.Module, *, to_cpu: bool = False) -> None:
        self.modules: list[tuple[nn.Module, type, dict[str, tuple[Any, Any]]]] = []
        self.configs: dict[int, tuple[Any, dict[str, Any]]] = {}  # HF-style config objects, edited in place
        tensors: dict[int, torch.Tensor] = {}
        for mod in model.modules():
            attrs = {k: (v, _shallow(v) if isinstance(v, _CONTAINERS) else None) for k, v in vars(mod).items()}
            self.modules.append((mod, type(mod), attrs))
            for v in vars(mod).values():
                if callable(getattr(v, "to_dict", None)) and hasattr(v, "__dict__") and not isinstance(v, nn.Module):
                    self.configs.setdefault(id(v), (v, copy.deepcopy(vars(v))))
            for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                if t is not None:
                    tensors.setdefault(id(t), t)
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, Any]] = []
        with torch.no_grad():
            for t in tensors.values():
                alias = t.detach()  # keeps the original storage alive, to be put back if replaced
                value = alias.to("cpu", copy=True) if to_cpu else alias.clone()
                g = t.grad
                grad = None if g is None else (g, g.detach().clone())
                self.tensors.append((t, alias, value, t.requires_grad, grad))

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
                    v.update(content) if isinstance(v, (dict, set)) else v.extend(content)
                d[k] = v
        with torch.no_grad():
            for t, alias, value, requires_grad, grad in self.tensors:
                if t.is_meta or alias.is_meta:
                    continue
                if t.data_ptr() != alias.data_ptr() or t.shape != alias.shape or t.dtype != alias.dtype:
                    t.data = alias  # the verb replaced .data: give the tensor its own storage back
                alias.copy_(value)
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
                if grad is None:
                    t.grad = None
                else:
                    g, gv = grad
                    g.copy_(gv)
                    t.grad = g
