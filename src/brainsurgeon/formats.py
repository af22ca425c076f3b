"""The registry of compressed module formats, so saved models reload without pickling code.

A module type that brainsurgeon puts into a model (a packed int4 Linear, a factorized Linear, a
weight-shared Conv2d, ...) registers here. Its contract, checked at registration:

- ``spec(self) -> dict``: JSON-safe constructor arguments (shapes, bits, group size, ...);
- ``from_spec(cls, spec) -> nn.Module``: an empty module with every parameter/buffer already at
  its saved shape, ready for ``load_state_dict(strict=True)``.

``export.save`` writes ``{"format": name, "spec": m.spec()}`` per replaced module plus its
state_dict tensors (safetensors); ``export.load`` rebuilds through :func:`module_format`::

    >>> @register_module_format("int4_linear")
    ... class Int4Linear(nn.Module):
    ...     def spec(self): return {"in_features": self.in_features, ...}
    ...     @classmethod
    ...     def from_spec(cls, spec): return cls(**spec)
    >>> module_format("int4_linear").from_spec({...})
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import FormatError

_FORMATS: dict[str, type[nn.Module]] = {}


def register_module_format(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register an ``nn.Module`` subclass as a saveable format under `name`."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"module format {name!r}: {cls!r} is not an nn.Module subclass")
        missing = [a for a in ("spec", "from_spec") if not callable(getattr(cls, a, None))]
        if missing:
            raise TypeError(f"module format {name!r}: {cls.__name__} lacks {missing}; "
                            f"define spec(self) -> dict and classmethod from_spec(cls, spec)")
        if name in _FORMATS and _FORMATS[name] is not cls:
            raise TypeError(f"module format {name!r} is already registered by {_FORMATS[name].__name__}")
        cls.format_name = name  # type: ignore[attr-defined]
        _FORMATS[name] = cls
        return cls

    return deco


def module_format(name: str) -> type[nn.Module]:
    """The class registered under `name`; a clear error listing the known formats otherwise."""
    if name not in _FORMATS:
        raise FormatError(f"unknown module format {name!r}; registered: {sorted(_FORMATS)}. "
                          f"Import the package that defines it, or register it with "
                          f"@brainsurgeon.formats.register_module_format({name!r})")
    return _FORMATS[name]


def registered_module_formats() -> list[str]:
    """Names of every registered module format."""
    return sorted(_FORMATS)
