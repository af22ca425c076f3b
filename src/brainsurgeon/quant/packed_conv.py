"""Packed Conv2d: int8 or int4 codes with grouped scales, dequantized on the fly.

PyTorch has no integer-weight conv kernel on CPU that takes this format, so forward rebuilds the
float kernel (``scale * (q - zero)``) and calls ``F.conv2d``: a storage win (4x / 8x smaller
weights), **no speed win** -- ``kernel`` says so, and the report shows it. Groups run along the
flattened (in_channels/groups x kh x kw) columns of each output channel, PyTorch's order::

    >>> m = PackedConv2d.from_conv(nn.Conv2d(16, 32, 3), bits=4, rtn=True)
    >>> m.kernel
    'dequantize + F.conv2d (storage only, no integer conv kernel)'
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..formats import register_module_format
from .codes import GridCodes, check_group_size
from .packed import pack_nibbles, unpack_nibbles, weight_codes


@register_module_format("packed_conv2d")
class PackedConv2d(nn.Module):
    """Conv2d with a packed weight: ``qweight`` uint8 (two 4-bit codes a byte) or int8, ``scale``/``zero``.

    >>> m = PackedConv2d.from_conv(conv, bits=8)          # conv's weight already on an 8-bit grid
    >>> m.nbytes() < conv.weight.numel() * 4 / 3
    True
    """

    kernel = "dequantize + F.conv2d (storage only, no integer conv kernel)"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int] | str, dilation: list[int], groups: int = 1, bias: bool = True,
                 bits: int = 8, group_size: int = 0, device: Any = None) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ConfigError(f"PackedConv2d: bits={bits} must be in [2, 8]")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = list(kernel_size), list(stride), list(dilation)
        self.padding = padding if isinstance(padding, str) else list(padding)
        self.bits = bits
        cols = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self.group_size = check_group_size(cols, group_size, "PackedConv2d")
        G = cols // self.group_size
        packed_cols = -(-cols // 2) if bits <= 4 else cols  # odd columns: the last nibble is padding
        dtype = torch.uint8 if bits <= 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(out_channels, packed_cols, dtype=dtype, device=device))
        self.register_buffer("scale", torch.ones(out_channels, G, device=device))
        self.register_buffer("zero", torch.zeros(out_channels, G, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)

    def spec(self) -> dict[str, Any]:
        """JSON-safe constructor arguments (see :mod:`brainsurgeon.formats`)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PackedConv2d:
        """An empty module with every buffer at its saved shape."""
        return cls(**spec)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, codes: GridCodes | None = None, *, bits: int = 8,
                  group_size: int = 0, rtn: bool = False, sym: bool = True, mse: bool = True,
                  name: str = "") -> PackedConv2d:
        """Pack a float Conv2d (zeros padding mode only) from its on-grid weight, codes, or RTN."""
        if conv.padding_mode != "zeros":
            raise ConfigError(f"layer {name or '?'}: padding_mode={conv.padding_mode!r} is not supported by "
                              f"PackedConv2d (only 'zeros'); leave this layer out (ignore=[...])")
        codes = codes or weight_codes(conv, bits, group_size, rtn, sym, name, mse)
        m = cls(conv.in_channels, conv.out_channels, list(conv.kernel_size), list(conv.stride),
                conv.padding if isinstance(conv.padding, str) else list(conv.padding), list(conv.dilation),
                conv.groups, conv.bias is not None, codes.bits, codes.group_size, device=conv.weight.device)
        q = codes.q
        if m.bits <= 4:
            q = F.pad(q, (0, q.shape[1] % 2))
            m.qweight.copy_(pack_nibbles(q))
        else:
            m.qweight.copy_((q - 128).to(torch.int8))
        m.scale.copy_(codes.scale)
        m.zero.copy_(codes.zero)
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach())
        return m

    def codes(self) -> torch.Tensor:
        """Integer codes, out_channels x (in/groups * kh * kw)."""
        cols = self.scale.shape[1] * self.group_size
        if self.bits <= 4:
            return unpack_nibbles(self.qweight)[:, :cols]
        return self.qweight.to(torch.int32) + 128

    def dequantize(self) -> torch.Tensor:
        """The float32 kernel ``scale * (q - zero)``, out x in/groups x kh x kw."""
        s = self.scale.repeat_interleave(self.group_size, dim=1)
        z = self.zero.repeat_interleave(self.group_size, dim=1)
        W = s * (self.codes().to(s.dtype) - z)
        return W.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def nbytes(self) -> int:
        """Bytes of the stored state (codes + scales + zeros + bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.dequantize().to(x.dtype), b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, bits={self.bits}, group_size={self.group_size}")
