"""Constructor specs of standard torch modules, so a structurally pruned model reloads without pickles.

A spec is the JSON-safe set of constructor arguments that fixes every parameter/buffer shape.
Compressed module types registered in :mod:`brainsurgeon.formats` supply their own ``spec()``;
this table covers the plain torch modules that structural pruning narrows::

    >>> s = module_spec(nn.Linear(8, 3))
    >>> s
    {'format': 'torch.Linear', 'spec': {'in_features': 8, 'out_features': 3, 'bias': True}}
    >>> build_module(s).weight.shape
    torch.Size([3, 8])

Adding a type: one entry in ``_TABLE`` (class, spec function, constructor); the rebuilt module is
built with the default device and dtype and then receives the saved tensors (their dtype too).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import FormatError
from ..formats import module_format

Spec = dict[str, Any]


def _conv(m: nn.modules.conv._ConvNd) -> Spec:
    pad = m.padding if isinstance(m.padding, str) else list(m.padding)
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": pad, "dilation": list(m.dilation), "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _no_bias(m: nn.Module, s: Spec) -> Spec:
    """Add ``bias=False`` only for an affine norm built without bias (torch >= 2.14 has the argument)."""
    if getattr(m, "affine", False) and getattr(m, "bias", None) is None:
        s["bias"] = False
    return s


def _bn(m: nn.modules.batchnorm._BatchNorm) -> Spec:
    return _no_bias(m, {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                        "track_running_stats": m.track_running_stats})


def _rnn(m: nn.RNNBase) -> Spec:
    s = {"input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers, "bias": m.bias,
         "batch_first": m.batch_first, "dropout": m.dropout, "bidirectional": m.bidirectional}
    if isinstance(m, nn.LSTM):
        s["proj_size"] = m.proj_size
    return s


def _mha(m: nn.MultiheadAttention) -> Spec:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim, "batch_first": m.batch_first}


def _hf_conv1d_cls() -> type[nn.Module] | None:
    try:
        return importlib.import_module("transformers.pytorch_utils").Conv1D
    except ImportError:
        return None


# name -> (class, spec function); constructors are the classes themselves (cls(**spec))
_TABLE: dict[str, tuple[type[nn.Module], Callable[[Any], Spec]]] = {
    "torch.Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                           "bias": m.bias is not None}),
    "torch.Conv1d": (nn.Conv1d, _conv),
    "torch.Conv2d": (nn.Conv2d, _conv),
    "torch.Conv3d": (nn.Conv3d, _conv),
    "torch.BatchNorm1d": (nn.BatchNorm1d, _bn),
    "torch.BatchNorm2d": (nn.BatchNorm2d, _bn),
    "torch.BatchNorm3d": (nn.BatchNorm3d, _bn),
    "torch.LayerNorm": (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                                 "elementwise_affine": m.elementwise_affine,
                                                 "bias": getattr(m, "bias", None) is not None}),
    "torch.GroupNorm": (nn.GroupNorm, lambda m: _no_bias(m, {"num_groups": m.num_groups,
                                                                "num_channels": m.num_channels,
                                                                "eps": m.eps, "affine": m.affine})),
    "torch.Embedding": (nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                                                 "padding_idx": m.padding_idx, "max_norm": m.max_norm,
                                                 "norm_type": m.norm_type, "scale_grad_by_freq": m.scale_grad_by_freq,
                                                 "sparse": m.sparse}),
    "torch.MultiheadAttention": (nn.MultiheadAttention, _mha),
    "torch.LSTM": (nn.LSTM, _rnn),
    "torch.GRU": (nn.GRU, _rnn),
    "torch.RNN": (nn.RNN, lambda m: {**_rnn(m), "nonlinearity": m.nonlinearity}),
}


def _table_name(m: nn.Module) -> str | None:
    for name, (cls, _) in _TABLE.items():
        if type(m) is cls:
            return name
    for name, (cls, _) in _TABLE.items():
        if isinstance(m, cls):  # a user's subclass (e.g. a Conv2d padding in forward): resized in place
            return name
    conv1d = _hf_conv1d_cls() if type(m).__name__ == "Conv1D" else None
    if conv1d is not None and type(m) is conv1d:
        return "hf.Conv1D"
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_spec(m: nn.Module) -> Spec | None:
    """``{"format", "spec"}`` for a registered compressed format or a standard torch module; else None.

    >>> module_spec(nn.Conv2d(3, 8, 3))["spec"]["out_channels"]
    8
    """
    fmt = getattr(type(m), "format_name", None)
    if fmt is not None and callable(getattr(m, "spec", None)):
        return {"format": fmt, "spec": m.spec(), "module": type(m).__module__}
    name = _table_name(m)
    if name == "hf.Conv1D":
        nx, nf = m.weight.shape
        return {"format": name, "spec": {"nf": int(nf), "nx": int(nx)}}
    if name is not None:
        entry = {"format": name, "spec": _TABLE[name][1](m)}
        if type(m) is not _TABLE[name][0]:
            entry["subclass"] = _qualname(type(m))
        return entry
    return None


def _tensor_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None}


def check_rebuildable(name: str, m: nn.Module, entry: Spec) -> None:
    """Refuse (before anything is written) a module whose spec would not rebuild its tensors' shapes.

    The spec comes from the module's attributes (``out_channels``...); when they disagree with its
    tensors (a hand-made surgery that forgot an attribute), load() could not rebuild the module. A
    user's subclass of a supported type is rebuilt by resizing it in place (its extra tensors are
    kept as model_fn builds them).
    """
    import torch

    with torch.device("meta"):
        plain = build_module({k: v for k, v in entry.items() if k != "subclass"})
    want, have = _tensor_shapes(plain), _tensor_shapes(m)
    diff = sorted(k for k in want if want[k] != have.get(k))  # a subclass's extra tensors are its own
    if diff:
        base = f"a subclass of {entry['format']}" if entry.get("subclass") else entry["format"]
        raise FormatError(f"module {name!r} ({type(m).__name__}, {base}) holds tensors {diff} whose shapes "
                          f"{[have.get(k) for k in diff]} its constructor spec does not describe "
                          f"({[want.get(k) for k in diff]}); save() refuses it because load() could not rebuild "
                          f"it. Keep its attributes in sync with its weights, or save model.state_dict() for "
                          f"the exact architecture")


def _import_format_module(entry: Spec) -> None:
    """Import the brainsurgeon module that registers `entry`'s format (only brainsurgeon's own code)."""
    mod = entry.get("module")
    if isinstance(mod, str) and (mod == "brainsurgeon" or mod.startswith("brainsurgeon.")):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass  # module_format() below raises the clear error


def build_module(entry: Spec) -> nn.Module:
    """An empty module with every parameter/buffer at the shapes `entry` describes.

    >>> build_module({"format": "torch.Linear", "spec": {"in_features": 4, "out_features": 2, "bias": False}})
    Linear(in_features=4, out_features=2, bias=False)
    """
    fmt, spec = entry.get("format"), entry.get("spec")
    if not isinstance(fmt, str) or not isinstance(spec, dict):
        raise FormatError(f"module entry {entry!r} needs a 'format' string and a 'spec' mapping; "
                          f"the manifest is damaged, save the model again")
    if fmt == "hf.Conv1D":
        cls = _hf_conv1d_cls()
        if cls is None:
            raise FormatError("format 'hf.Conv1D' needs transformers; pip install transformers")
        return cls(spec["nf"], spec["nx"])
    _check_sizes(fmt, spec)
    if fmt in _TABLE:
        cls = _TABLE[fmt][0]
        kw = dict(spec)
        for k in ("kernel_size", "stride", "dilation", "normalized_shape"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        if isinstance(kw.get("padding"), list):
            kw["padding"] = tuple(kw["padding"])
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise FormatError(f"cannot rebuild {fmt} from spec {spec}: {e}; the manifest does not match "
                              f"this torch version or is damaged") from e
    _import_format_module(entry)
    fmt_cls = module_format(fmt)
    try:
        return fmt_cls.from_spec(spec)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise FormatError(f"cannot rebuild {fmt} from spec {spec}: {type(e).__name__}: {e}; the manifest is "
                          f"damaged or was written by another version, save the model again") from e


def _check_sizes(fmt: str, spec: Any) -> None:
    """Every integer in a spec is a size, a count or a flag: none may be negative (no allocation yet)."""
    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, int) and not isinstance(x, bool) and x < 0 and not path.endswith(("padding_idx", "dim")):
            raise FormatError(f"{fmt} spec field {path.lstrip('.')} = {x} is negative; the manifest is damaged, "
                              f"save the model again")
    walk(spec, "")


def spec_bytes(entry: Spec) -> int | None:
    """Bytes the module `entry` describes would allocate, measured on the meta device (None if unknown).

    >>> spec_bytes({"format": "torch.Linear", "spec": {"in_features": 4, "out_features": 2, "bias": False}})
    32
    """
    import torch

    try:
        with torch.device("meta"):
            m = build_module({k: v for k, v in entry.items() if k != "subclass"})
    except FormatError:
        if entry.get("format") in _TABLE or entry.get("format") == "hf.Conv1D":
            raise
        return None  # a registered format that cannot be built on meta: its real build is wrapped
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def resize_like_(cur: nn.Module, entry: Spec, device: Any = None) -> None:
    """Give `cur` (a user's subclass of a supported type) the tensors and size attributes of `entry`,
    keeping its class and every other attribute; the values are placeholders until the weights load.

    >>> resize_like_(model.stem, {"format": "torch.Conv2d", "spec": {..., "out_channels": 23}, "subclass": ...})
    """
    import torch

    with torch.device("meta"):
        plain = build_module({k: v for k, v in entry.items() if k != "subclass"})
    for k in list(entry["spec"]) + ["_reversed_padding_repeated_twice"]:
        if k in vars(plain) and k in vars(cur):
            vars(cur)[k] = vars(plain)[k]
    for store in ("_parameters", "_buffers"):
        mine, theirs = getattr(cur, store), getattr(plain, store)
        for k, t in theirs.items():
            old = mine.get(k)
            if t is None:
                mine[k] = None
                continue
            ref = old if old is not None else t
            dev = device if device is not None else (old.device if old is not None else None)
            new = torch.zeros(t.shape, dtype=ref.dtype, device=dev if dev is not None and dev.type != "meta" else None)
            mine[k] = nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True) \
                if store == "_parameters" else new


def same_structure(m: nn.Module, entry: Spec) -> bool:
    """True when `m` already has the format and spec of `entry` (no rebuild needed)."""
    cur = module_spec(m)
    return cur is not None and cur["format"] == entry.get("format") and _jsonish(cur["spec"]) == entry.get("spec")


def _jsonish(x: Any) -> Any:
    """Tuples as lists, as they come back from JSON."""
    if isinstance(x, dict):
        return {k: _jsonish(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    return x


def jsonable(x: Any) -> Any:
    """`x` with tuples turned into lists (what JSON gives back); raises FormatError on non-JSON values."""
    y = _jsonish(x)
    if not _is_json(y):
        raise FormatError(f"spec {x!r} is not JSON-safe (only str/int/float/bool/None/list/dict); "
                          f"fix the format's spec() to return plain values")
    return y


def _is_json(x: Any) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_is_json(v) for v in x)
    return x is None or isinstance(x, (str, int, float, bool))
