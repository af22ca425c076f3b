"""`pack_`: swap the quantized Linear / Conv2d layers of a model for packed integer modules.

transformers' ``Conv1D`` (GPT-2: weight ``[in, out]``, ``y = x @ W + b``) is a Linear with its weight
transposed: it is packed as that Linear (the packed module computes the same ``y``).

After ``quantize_(model, GPTQ(bits=4, group_size=128), calib)`` the weights are floats on a 4-bit
grid; ``pack_`` reads the codes back (exactly: the packed modules dequantize to the same weights)
and replaces each layer in place. ``rtn=True`` rounds float weights to the grid instead::

    >>> rows = pack_(model, Pack(bits=4, group_size=128))           # after quantize_(..., bits=4)
    >>> rows = pack_(model, Pack(bits=8, activations="dynamic_int8", group_size=0, rtn=True))
    >>> [(r.name, r.kernel, r.packed_bytes) for r in rows]

Every replacement is built (and validated) before the first swap, so on error the model is
untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import Config, compile_patterns, register_config
from ..errors import ConfigError
from .dynamic import DynamicInt8Linear
from .packed import COMPUTE_DTYPES, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from .packed_conv import PackedConv2d

ACTIVATIONS = ("weight_only", "dynamic_int8")


@register_config
@dataclass(frozen=True)
class Pack(Config):
    """How :func:`pack_` stores quantized layers.

    bits: 2..4 -> int4 storage (``Int4WeightOnlyLinear``), 5..8 -> int8 storage.
    group_size: input columns per scale/zero (0: one per output channel).
    activations: ``weight_only`` or ``dynamic_int8`` (int8 GEMM; needs bits=8, group_size=0).
    compute_dtype: activation dtype of the weight-only kernels (``bfloat16`` is the fast one on CPU).
    rtn: round float weights onto a fresh grid (lossy) instead of requiring on-grid weights;
    mse: with rtn, shrink the grid's range to minimise the rounding error (slower, more accurate).
    convs: also pack Conv2d layers (dequantized on the fly: smaller, not faster).

    >>> Pack(bits=4, group_size=128); Pack(bits=8, activations="dynamic_int8", group_size=0)
    """

    verb: ClassVar[str] = "pack"

    bits: int = 4
    group_size: int = 128
    activations: str = "weight_only"
    compute_dtype: str = "bfloat16"
    rtn: bool = False
    sym: bool = True
    mse: bool = True
    convs: bool = True

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"Pack: {msg}")

        check(isinstance(self.bits, int) and 2 <= self.bits <= 8,
              f"bits must be an integer in [2, 8], got {self.bits!r}")
        check(isinstance(self.group_size, int) and self.group_size >= 0,
              f"group_size must be 0 (per output channel) or a positive column count, got {self.group_size!r}")
        check(self.activations in ACTIVATIONS, f"activations must be one of {list(ACTIVATIONS)}, "
                                               f"got {self.activations!r}")
        check(self.compute_dtype in COMPUTE_DTYPES, f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                                                    f"got {self.compute_dtype!r}")
        if self.activations == "dynamic_int8":
            check(self.bits == 8 and self.group_size == 0,
                  f"activations='dynamic_int8' needs bits=8 and group_size=0 (per-channel int8 weights), "
                  f"got bits={self.bits}, group_size={self.group_size}")

    def describe(self) -> str:
        g = f" g{self.group_size}" if self.group_size else ""
        return f"Pack int{4 if self.bits <= 4 else 8}{g} {self.activations}"


@dataclass
class PackedRow:
    """One swapped layer: its name, saveable format, compute kernel, and bytes before/after."""

    name: str
    format: str
    kernel: str
    dense_bytes: int
    packed_bytes: int


def hf_conv1d_as_linear(module: nn.Module) -> nn.Linear | None:
    """transformers' ``Conv1D`` as the equivalent ``nn.Linear`` (weight transposed, bias shared); else None.

    >>> hf_conv1d_as_linear(gpt2.transformer.h[0].mlp.c_fc).weight.shape     # [out, in]
    torch.Size([3072, 768])
    """
    w = getattr(module, "weight", None)
    if type(module).__name__ != "Conv1D" or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    b = getattr(module, "bias", None)
    lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().t(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.detach(), requires_grad=False)
    return lin


def _packable(m: nn.Module, convs: bool) -> bool:
    return type(m) is nn.Linear or (convs and type(m) is nn.Conv2d) or hf_conv1d_as_linear(m) is not None


def pack_module(module: nn.Module, cfg: Pack, name: str = "") -> nn.Module:
    """The packed replacement of one Linear/Conv2d (the module itself is not changed).

    >>> pack_module(nn.Linear(256, 64), Pack(bits=4, group_size=64, rtn=True))
    Int4WeightOnlyLinear(in_features=256, out_features=64, bits=4, group_size=64, ...)
    """
    kw = {"rtn": cfg.rtn, "sym": cfg.sym, "mse": cfg.mse, "name": name}
    module = hf_conv1d_as_linear(module) or module
    if isinstance(module, nn.Linear):
        if cfg.activations == "dynamic_int8":
            return DynamicInt8Linear.from_linear(module, **kw)
        cls = Int4WeightOnlyLinear if cfg.bits <= 4 else Int8WeightOnlyLinear
        if cls is Int4WeightOnlyLinear:  # shape rules first: a clear error before any rounding
            from .packed import _int4_kernel_group

            _int4_kernel_group(module.in_features, module.out_features, cfg.group_size)
        return cls.from_linear(module, bits=cfg.bits, group_size=cfg.group_size,
                               compute_dtype=cfg.compute_dtype, **kw)
    if isinstance(module, nn.Conv2d):
        bits = 8 if cfg.activations == "dynamic_int8" else cfg.bits
        return PackedConv2d.from_conv(module, bits=bits, group_size=cfg.group_size, **kw)
    raise ConfigError(f"layer {name or '?'}: {type(module).__name__} cannot be packed; "
                      f"only nn.Linear, nn.Conv2d and transformers' Conv1D are supported")


def pack_(model: nn.Module, cfg: Pack | None = None, *, ignore: Iterable[str] = ()) -> list[PackedRow]:
    """Replace every Linear and HF Conv1D (and, with cfg.convs, Conv2d) of `model` in place by its packed module.

    ignore: module-name regexes to leave as they are. Returns one :class:`PackedRow` per swap.

    >>> quantize_(model, GPTQ(bits=4, group_size=128), calib=loader)
    >>> rows = pack_(model, Pack(bits=4, group_size=128), ignore=("lm_head",))
    """
    cfg = Pack() if cfg is None else cfg
    if not isinstance(cfg, Pack):
        raise ConfigError(f"pack_ needs a Pack config (e.g. Pack(bits=4, group_size=128)), got {cfg!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"pack_ needs an nn.Module as model, got {type(model).__name__}")
    ign = compile_patterns(ignore, [n for n, _ in model.named_modules() if n],
                           candidates=[n for n, m in model.named_modules() if n and _packable(m, cfg.convs)])
    todo = {n: m for n, m in model.named_modules()
            if n and _packable(m, cfg.convs) and not any(p.fullmatch(n) for p in ign)}
    if not todo:
        raise ConfigError(f"pack_: no nn.Linear{'/nn.Conv2d' if cfg.convs else ''} left to pack in "
                          f"{type(model).__name__} after ignore={list(ignore)}")
    new = {n: pack_module(m, cfg, n) for n, m in todo.items()}  # validate everything first
    rows = []
    for n, m in new.items():
        old = todo[n]
        m.train(old.training)
        model.set_submodule(n, m)
        dense = sum(t.numel() * t.element_size() for t in old.state_dict().values())
        rows.append(PackedRow(n, type(m).format_name, m.kernel, dense, m.nbytes()))
    return rows
