"""Packed weight-only int8 / int4 Linear modules that run PyTorch's integer-weight CPU kernels.

The weight is stored as integer codes plus a float32 ``scale`` and ``zero`` per (output row,
group of ``group_size`` input columns), exactly the grid of :mod:`brainsurgeon.quant.grid`:
``W = scale * (q - zero)``. All state is plain tensors (buffers) in ``state_dict()``:

=============================  ===========================================  ============================
module                         buffers (N = out_features, K = in_features)  kernel on CPU
=============================  ===========================================  ============================
``Int8WeightOnlyLinear``       ``qweight`` int8 N x K (``q - 128``),         ``aten._weight_int8pack_mm``
                               ``scale``/``zero`` float32 N x G              (one call per group)
``Int4WeightOnlyLinear``       ``qweight`` uint8 N x K/2 (two codes a byte,  ``aten._weight_int4pack_mm_for_cpu``
                               low nibble = even column), ``scale``/``zero``
=============================  ===========================================  ============================

Activations are cast to ``compute_dtype`` for the kernel (default ``bfloat16``: measured on this
project's AVX-512 CPU, the float32-activation paths of both kernels are 10-60x slower than dense
fp32; the bfloat16 paths are 1.4-2.3x faster than fp32 ``F.linear`` at 1 token (decoding) and on
par or slower from ~32-128 tokens on: a storage win first, a speed win only for small batches;
use ``"float32"`` for exact-arithmetic checks).
On other devices the modules dequantize the weight on the fly (``kernel`` says which path runs)::

    >>> m = Int4WeightOnlyLinear.from_linear(nn.Linear(256, 64), group_size=64, rtn=True)
    >>> y = m(torch.randn(8, 256)); m.kernel
    'aten._weight_int4pack_mm_for_cpu (bfloat16 activations)'
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..formats import register_module_format
from .codes import GridCodes, check_group_size, codes_from_grid, recover_codes
from .grid import fit_grid

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (rows x cols, cols even) -> uint8 rows x cols/2, low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 rows x cols/2 -> int32 rows x cols."""
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1).to(torch.int32)


def weight_codes(linear: nn.Module, bits: int, group_size: int, rtn: bool, sym: bool = True,
                 name: str = "", mse: bool = True) -> GridCodes:
    """Codes of a float layer's weight (rows x cols): read back from an on-grid weight, or rounded (rtn).

    >>> c = weight_codes(nn.Linear(64, 32), bits=4, group_size=32, rtn=True)
    """
    W = linear.weight.detach().reshape(linear.weight.shape[0], -1).float()
    if rtn:
        gs = check_group_size(W.shape[1], group_size, name)
        return codes_from_grid(W, fit_grid(W, bits, sym, 0 if gs == W.shape[1] else gs, mse), name)
    return recover_codes(W, bits, group_size, name)


class CachedKernel(nn.Module):
    """A quantized layer that caches kernel-side forms of its buffers (transposed or prepacked codes)
    in ``self._cache``; the cache is dropped whenever the buffers move, change dtype or are loaded."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[str, Any] = {}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        self._cache.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of the stored state (codes, scales, zeros, bias), as saved."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class _PackedLinear(CachedKernel):
    """Shared shape bookkeeping, forward reshaping, bytes, spec/from_spec of the packed Linears."""

    storage_bits = 8

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool, compute_dtype: str, device: Any = None) -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"{type(self).__name__}: compute_dtype={compute_dtype!r}; "
                              f"allowed: {sorted(COMPUTE_DTYPES)}")
        if not 2 <= bits <= self.storage_bits:
            raise ConfigError(f"{type(self).__name__}: bits={bits} must be in [2, {self.storage_bits}] "
                              f"(codes are stored in {self.storage_bits}-bit slots)")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = check_group_size(in_features, group_size, type(self).__name__)
        self.compute_dtype = compute_dtype
        G = in_features // self.group_size
        self.register_buffer("scale", torch.ones(out_features, G, device=device))
        self.register_buffer("zero", torch.zeros(out_features, G, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    # -- saveable format
    def spec(self) -> dict[str, Any]:
        """JSON-safe constructor arguments (see :mod:`brainsurgeon.formats`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None,
                "compute_dtype": self.compute_dtype}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> _PackedLinear:
        """An empty module with every buffer at its saved shape."""
        return cls(**spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, codes: GridCodes | None = None, *, bits: int | None = None,
                    group_size: int = 0, rtn: bool = False, sym: bool = True, mse: bool = True,
                    compute_dtype: str = "bfloat16", name: str = "") -> _PackedLinear:
        """Pack a float Linear: its on-grid weight (default), the given codes, or RTN-rounded (rtn=True).

        >>> q = Int8WeightOnlyLinear.from_linear(lin, bits=8)     # lin was quantized to 8 bits
        """
        bits = bits or (codes.bits if codes else cls.storage_bits)
        codes = codes or weight_codes(linear, bits, group_size, rtn, sym, name, mse)
        m = cls(linear.in_features, linear.out_features, bits, codes.group_size, linear.bias is not None,
                compute_dtype, device=linear.weight.device)
        m.load_codes(codes)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def load_codes(self, codes: GridCodes) -> None:
        """Fill the buffers from codes (shapes must match this module's)."""
        self.scale.copy_(codes.scale)
        self.zero.copy_(codes.zero)
        self._store(codes.q.to(self.scale.device))
        self._cache.clear()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``scale * (q - zero)``, out_features x in_features."""
        s = self.scale.repeat_interleave(self.group_size, dim=1)
        z = self.zero.repeat_interleave(self.group_size, dim=1)
        return s * (self.codes().to(s.dtype) - z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._uses_kernel(x2):
            y = self._kernel_mm(x2.to(COMPUTE_DTYPES[self.compute_dtype]).contiguous()).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and self.scale.device.type == "cpu"

    @property
    def kernel(self) -> str:
        """The compute path forward takes on the module's current device (shown in reports)."""
        if self.scale.device.type == "cpu":
            return f"{self.kernel_name} ({self.compute_dtype} activations)"
        return f"dequantize + F.linear ({self.kernel_name} is wired for CPU only; {self.scale.device.type})"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel!r}")

    # subclasses: _store(q), codes(), _kernel_mm(x2), kernel_name
    def _store(self, q: torch.Tensor) -> None:
        raise NotImplementedError

    def codes(self) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_module_format("int8_weight_only_linear")
class Int8WeightOnlyLinear(_PackedLinear):
    """Weight-only int8 Linear: ``y = x (scale * (q - zero))^T + b`` via ``aten._weight_int8pack_mm``.

    With ``q' = q - 128`` (int8) and per-group scale ``s``: ``x W^T = sum_g int8mm(x_g, q'_g, s_g)
    - sum_g (sum_{k in g} x_k) s_g (zero_g - 128)``; the second term vanishes for symmetric grids.
    The kernel takes one scale per output channel, so ``group_size > 0`` costs one kernel call
    (and one slice copy) per group: per-channel int8 (``group_size=0``) is the fast layout.

    >>> m = Int8WeightOnlyLinear.from_linear(nn.Linear(128, 32), rtn=True)   # 8-bit, per channel
    >>> m.nbytes()           # 32*128 (codes) + 2 * 32*1*4 (scale, zero) + 32*4 (bias)
    4480
    """

    storage_bits = 8
    kernel_name = "aten._weight_int8pack_mm"

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = 0,
                 bias: bool = True, compute_dtype: str = "bfloat16", device: Any = None) -> None:
        super().__init__(in_features, out_features, bits, group_size, bias, compute_dtype, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))

    def _store(self, q: torch.Tensor) -> None:
        self.qweight.copy_((q - 128).to(torch.int8))

    def codes(self) -> torch.Tensor:
        return self.qweight.to(torch.int32) + 128

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        # x: M x K in compute dtype
        c = self._cache
        if "scale" not in c:
            c["scale"] = self.scale.t().contiguous().to(x.dtype)  # G x N
            off = self.scale * (self.zero - 128)  # N x G: the weight's offset per group
            c["offset"] = off.t().contiguous().to(x.dtype) if bool((off != 0).any()) else None
        gs, G = self.group_size, self.scale.shape[1]
        if G == 1:
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, c["scale"][0])
        else:
            y = sum(torch.ops.aten._weight_int8pack_mm(x[:, g * gs:(g + 1) * gs].contiguous(),
                                                       self.qweight[:, g * gs:(g + 1) * gs].contiguous(),
                                                       c["scale"][g]) for g in range(G))
        if c["offset"] is not None:
            y = y - x.reshape(x.shape[0], G, gs).sum(-1) @ c["offset"]  # (M x G) @ (G x N)
        return y


@register_module_format("int4_weight_only_linear")
class Int4WeightOnlyLinear(_PackedLinear):
    """Weight-only int4 Linear via ``aten._weight_int4pack_mm_for_cpu`` (grouped scales and zeros).

    The kernel computes ``((q - 8) * s + z_f)`` with the float zero ``z_f = s (8 - zero)``, which
    equals ``s (q - zero)``. Shape constraints of the kernel, checked on construction:
    ``out_features % 16 == 0``, ``in_features % 32 == 0`` and a group size in {32, 64, 128, 256}
    (or 0: one group per row, run as the largest of those that divides in_features). The
    kernel-side weight layout is built on the first CPU forward and cached (not saved).

    >>> m = Int4WeightOnlyLinear.from_linear(nn.Linear(256, 64), group_size=128, rtn=True)
    >>> m.nbytes()           # 64*256/2 (codes) + 2 * 64*2*4 (scale, zero) + 64*4 (bias)
    9472
    """

    storage_bits = 4
    kernel_name = "aten._weight_int4pack_mm_for_cpu"

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = True, compute_dtype: str = "bfloat16", device: Any = None) -> None:
        self.kernel_group = _int4_kernel_group(in_features, out_features, group_size)
        super().__init__(in_features, out_features, bits, group_size, bias, compute_dtype, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                    device=device))

    def _store(self, q: torch.Tensor) -> None:
        self.qweight.copy_(pack_nibbles(q))

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        c = self._cache
        if "packed" not in c:
            c["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes(), 1)
        if c.get("dtype") is not x.dtype:
            rep = self.kernel_group and self.group_size // self.kernel_group  # kernel groups per stored group
            s = self.scale.repeat_interleave(rep, dim=1)  # N x K/kernel_group
            z = self.zero.repeat_interleave(rep, dim=1)
            c["sz"] = torch.stack([s.t(), (s * (8 - z)).t()], dim=-1).to(x.dtype).contiguous()  # Gk x N x 2
            c["dtype"] = x.dtype
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, c["packed"], self.kernel_group, c["sz"])


def _int4_kernel_group(in_features: int, out_features: int, group_size: int) -> int:
    """The kernel's group size for a stored group size; ConfigError naming the shape rule otherwise."""
    where = f"Int4WeightOnlyLinear({in_features} -> {out_features})"
    if out_features % 16 or in_features % 32:
        raise ConfigError(f"{where}: the int4 kernel needs out_features % 16 == 0 and in_features % 32 == 0 "
                          f"(got {out_features} % 16 = {out_features % 16}, {in_features} % 32 = "
                          f"{in_features % 32}); pack this layer with bits=8 or leave it out (ignore=[...])")
    if group_size in (0, in_features):
        return next(g for g in INT4_KERNEL_GROUPS if in_features % g == 0)
    if group_size not in INT4_KERNEL_GROUPS or in_features % group_size:
        raise ConfigError(f"{where}: group_size={group_size} is not supported by the int4 kernel; use one of "
                          f"{sorted(INT4_KERNEL_GROUPS)} that divides in_features={in_features}, "
                          f"or 0 for one group per output channel")
    return group_size
