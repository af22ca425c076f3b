"""Factorized modules that replace Linear and Conv2d layers, registered as saveable formats.

Each is a small sequence of plain ``nn.Linear`` / ``nn.Conv2d`` submodules, so later steps
(quantization, sharing) and calibration see ordinary layers::

    >>> m = LowRankLinear.from_factors(A, B, bias)          # y = A (B x) + bias
    >>> m.spec()
    {'in_features': 384, 'out_features': 1536, 'rank': 96, 'bias': True}
    >>> module_format("lowrank_linear").from_spec(m.spec()).load_state_dict(m.state_dict())
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import register_module_format


def _pair(v: Any) -> Any:
    """Spec values come back from JSON as lists; conv arguments want tuples (strings stay)."""
    return tuple(v) if isinstance(v, (list, tuple)) else v


@register_module_format("lowrank_linear")
class LowRankLinear(nn.Module):
    """``y = second(first(x))``: first (in -> rank, no bias), second (rank -> out, bias).

    >>> LowRankLinear(16, 8, rank=4)(torch.zeros(2, 16)).shape
    torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))  # (..., in) -> (..., r) -> (..., out)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """From A (out, r), B (r, in) and an optional bias (out,), on A's device and dtype."""
        m = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, device=A.device, dtype=A.dtype)
        with torch.no_grad():
            m.first.weight.copy_(B)
            m.second.weight.copy_(A)
            if bias is not None:
                m.second.bias.copy_(bias)
        return m

    def dense_weight(self) -> torch.Tensor:
        """``A B`` (out, in): the equivalent dense weight."""
        return self.second.weight.detach() @ self.first.weight.detach()

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankLinear:
        return cls(**spec)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
    return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "padding_mode": conv.padding_mode}


@register_module_format("lowrank_conv2d")
class LowRankConv2d(nn.Module):
    """Channel decomposition: first (k x k conv, in -> rank), second (1x1 conv, rank -> out, bias).

    The SVD of the conv's weight matrix (out, in*kh*kw) as convs (Zhang et al., "Accelerating
    Very Deep Convolutional Networks", TPAMI 2016).

    >>> LowRankConv2d(8, 16, 4, kernel_size=(3, 3), padding=(1, 1))(torch.zeros(1, 8, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: Any = (1, 1),
                 stride: Any = (1, 1), padding: Any = (0, 0), dilation: Any = (1, 1),
                 padding_mode: str = "zeros", bias: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.first = nn.Conv2d(in_channels, rank, _pair(kernel_size), _pair(stride), _pair(padding),
                               _pair(dilation), bias=False, padding_mode=padding_mode, device=device, dtype=dtype)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))  # (N, in, H, W) -> (N, r, H', W') -> (N, out, H', W')

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, A: torch.Tensor, B: torch.Tensor) -> LowRankConv2d:
        """From the conv it replaces, A (out, r) and B (r, in*kh*kw)."""
        m = cls(conv.in_channels, conv.out_channels, A.shape[1], bias=conv.bias is not None,
                device=A.device, dtype=A.dtype, **_conv_kwargs(conv))
        with torch.no_grad():
            m.first.weight.copy_(B.reshape(m.first.weight.shape))  # (r, in*kh*kw) -> (r, in, kh, kw)
            m.second.weight.copy_(A.reshape(m.second.weight.shape))  # (out, r) -> (out, r, 1, 1)
            if conv.bias is not None:
                m.second.bias.copy_(conv.bias)
        return m

    def dense_weight(self) -> torch.Tensor:
        """The equivalent kernel (out, in, kh, kw)."""
        B = self.first.weight.detach()
        A = self.second.weight.detach().flatten(1)  # (out, r)
        return (A @ B.flatten(1)).reshape(self.out_channels, *B.shape[1:])

    def spec(self) -> dict[str, Any]:
        f = self.first
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "rank": self.rank,
                "kernel_size": list(f.kernel_size), "stride": list(f.stride),
                "padding": f.padding if isinstance(f.padding, str) else list(f.padding),
                "dilation": list(f.dilation), "padding_mode": f.padding_mode,
                "bias": self.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankConv2d:
        return cls(**spec)


@register_module_format("tucker2_conv2d")
class Tucker2Conv2d(nn.Module):
    """Tucker-2: first (1x1, in -> r_in), core (k x k, r_in -> r_out; stride/padding/dilation), last (1x1, bias).

    >>> Tucker2Conv2d(8, 16, 4, 6, kernel_size=(3, 3), padding=(1, 1))(torch.zeros(1, 8, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, rank_in: int, rank_out: int,
                 kernel_size: Any = (3, 3), stride: Any = (1, 1), padding: Any = (0, 0),
                 dilation: Any = (1, 1), padding_mode: str = "zeros", bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.rank_in, self.rank_out = rank_in, rank_out
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False, **kw)
        # a 1x1 conv is pointwise, so it commutes with zero/reflect/circular padding of the core
        self.core = nn.Conv2d(rank_in, rank_out, _pair(kernel_size), _pair(stride), _pair(padding),
                              _pair(dilation), bias=False, padding_mode=padding_mode, **kw)
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))  # (N, S, H, W) -> (N, Ri, .) -> (N, Ro, H', W') -> (N, T, .)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, U: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> Tucker2Conv2d:
        """From the conv it replaces and its Tucker-2 factors U (T, Ro), G (Ro, Ri, kh, kw), V (S, Ri)."""
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, V.shape[1], U.shape[1], bias=conv.bias is not None,
                device=w.device, dtype=w.dtype, **_conv_kwargs(conv))
        with torch.no_grad():
            m.first.weight.copy_(V.t()[:, :, None, None])  # (Ri, S) -> (Ri, S, 1, 1)
            m.core.weight.copy_(G)
            m.last.weight.copy_(U[:, :, None, None])  # (T, Ro) -> (T, Ro, 1, 1)
            if conv.bias is not None:
                m.last.bias.copy_(conv.bias)
        return m

    def dense_weight(self) -> torch.Tensor:
        """The equivalent kernel (out, in, kh, kw)."""
        V = self.first.weight.detach().flatten(1).t()  # (S, Ri)
        U = self.last.weight.detach().flatten(1)  # (T, Ro)
        return torch.einsum("oihw,to,si->tshw", self.core.weight.detach(), U, V)

    def spec(self) -> dict[str, Any]:
        c = self.core
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "rank_in": self.rank_in, "rank_out": self.rank_out, "kernel_size": list(c.kernel_size),
                "stride": list(c.stride), "padding": c.padding if isinstance(c.padding, str) else list(c.padding),
                "dilation": list(c.dilation), "padding_mode": c.padding_mode, "bias": self.last.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Tucker2Conv2d:
        return cls(**spec)


FACTORIZED = (LowRankLinear, LowRankConv2d, Tucker2Conv2d)
