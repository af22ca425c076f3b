"""Compact-design conv modules (spatial / depthwise separable), registered as saveable formats.

Each is a pair of plain ``nn.Conv2d`` submodules, so calibration, quantization, the dependency graph
and ONNX export see ordinary convs (the bottleneck design reuses :class:`Tucker2Conv2d`)::

    >>> m = DepthwiseSeparableConv2d.from_factors(conv, D, P)     # depthwise k x k, then pointwise 1x1
    >>> module_format("depthwise_separable_conv2d").from_spec(m.spec()).load_state_dict(m.state_dict())
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import register_module_format
from .modules import _pair


def _spec_padding(p: Any) -> Any:
    return p if isinstance(p, str) else list(p)


@register_module_format("spatial_separable_conv2d")
class SpatialSeparableConv2d(nn.Module):
    """vertical (kh x 1 conv, in -> rank) then horizontal (1 x kw conv, rank -> out, bias).

    The original stride, padding and dilation are split by axis; with zero padding the pair computes
    exactly the conv with kernel ``sum_r Hh[t,r,j] V[r,s,i]`` (Jaderberg et al., BMVC 2014).

    >>> SpatialSeparableConv2d(8, 16, 4, kernel_size=(3, 3), padding=(1, 1))(torch.zeros(1, 8, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: Any = (3, 3),
                 stride: Any = (1, 1), padding: Any = (0, 0), dilation: Any = (1, 1), bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel_size, stride, padding, dilation))
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        kw_ = {"device": device, "dtype": dtype}
        self.vertical = nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, **kw_)
        self.horizontal = nn.Conv2d(rank, out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias, **kw_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal(self.vertical(x))  # (N, S, H, W) -> (N, R, H', W) -> (N, T, H', W')

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, V: torch.Tensor, Hh: torch.Tensor) -> SpatialSeparableConv2d:
        """From the conv it replaces, V (R, S, kh) and Hh (T, R, kw)."""
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, V.shape[0], conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.vertical.weight.copy_(V[:, :, :, None])  # (R, S, kh) -> (R, S, kh, 1)
            m.horizontal.weight.copy_(Hh[:, :, None, :])  # (T, R, kw) -> (T, R, 1, kw)
            if conv.bias is not None:
                m.horizontal.bias.copy_(conv.bias)
        return m

    def dense_weight(self) -> torch.Tensor:
        """The equivalent kernel (out, in, kh, kw)."""
        V = self.vertical.weight.detach()[:, :, :, 0]  # (R, S, kh)
        Hh = self.horizontal.weight.detach()[:, :, 0, :]  # (T, R, kw)
        return torch.einsum("trj,rsi->tsij", Hh, V)

    def spec(self) -> dict[str, Any]:
        v, h = self.vertical, self.horizontal
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "rank": self.rank,
                "kernel_size": [v.kernel_size[0], h.kernel_size[1]], "stride": [v.stride[0], h.stride[1]],
                "padding": [v.padding[0], h.padding[1]], "dilation": [v.dilation[0], h.dilation[1]],
                "bias": h.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SpatialSeparableConv2d:
        return cls(**spec)


@register_module_format("depthwise_separable_conv2d")
class DepthwiseSeparableConv2d(nn.Module):
    """depthwise (k x k, groups=in, `multiplier` filters per channel) then pointwise (1x1, in*m -> out, bias).

    >>> DepthwiseSeparableConv2d(8, 16, 2, kernel_size=(3, 3), padding=(1, 1))(torch.zeros(1, 8, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, multiplier: int, kernel_size: Any = (3, 3),
                 stride: Any = (1, 1), padding: Any = (0, 0), dilation: Any = (1, 1),
                 padding_mode: str = "zeros", bias: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.multiplier = in_channels, out_channels, multiplier
        kw_ = {"device": device, "dtype": dtype}
        mid = in_channels * multiplier
        self.depthwise = nn.Conv2d(in_channels, mid, _pair(kernel_size), _pair(stride), _pair(padding),
                                   _pair(dilation), groups=in_channels, bias=False, padding_mode=padding_mode, **kw_)
        self.pointwise = nn.Conv2d(mid, out_channels, 1, bias=bias, **kw_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))  # (N, S, H, W) -> (N, S*m, H', W') -> (N, T, H', W')

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, D: torch.Tensor, P: torch.Tensor) -> DepthwiseSeparableConv2d:
        """From the conv it replaces, D (S, m, kh*kw) and P (T, S, m)."""
        w = conv.weight
        S, m, _ = D.shape
        pad = conv.padding
        mod = cls(conv.in_channels, conv.out_channels, m, conv.kernel_size, conv.stride, pad, conv.dilation,
                  conv.padding_mode, conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.depthwise.weight.copy_(D.reshape(S * m, 1, *conv.kernel_size))  # channel s*m + a = filter (s, a)
            mod.pointwise.weight.copy_(P.reshape(P.shape[0], S * m, 1, 1))
            if conv.bias is not None:
                mod.pointwise.bias.copy_(conv.bias)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The equivalent kernel (out, in, kh, kw)."""
        m, S = self.multiplier, self.in_channels
        D = self.depthwise.weight.detach().reshape(S, m, -1)  # (S, m, kk)
        P = self.pointwise.weight.detach().reshape(self.out_channels, S, m)
        return torch.einsum("tsa,saq->tsq", P, D).reshape(self.out_channels, S, *self.depthwise.kernel_size)

    def spec(self) -> dict[str, Any]:
        d = self.depthwise
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "multiplier": self.multiplier,
                "kernel_size": list(d.kernel_size), "stride": list(d.stride), "padding": _spec_padding(d.padding),
                "dilation": list(d.dilation), "padding_mode": d.padding_mode, "bias": self.pointwise.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DepthwiseSeparableConv2d:
        return cls(**spec)


COMPACT = (SpatialSeparableConv2d, DepthwiseSeparableConv2d)
