"""Weight-only QDQ for ONNX: packed integer weights exported as integer initializers + a dequantize.

A packed Linear/Conv2d (int8/int4 codes, per-group scale and zero) runs custom CPU kernels that
ONNX cannot express. :class:`WeightOnlyQDQ` computes the same dense weight with plain ops,
``W = (q + 128 - zero) * scale`` per group (q: int8 codes shifted by -128), so the exported graph
stores the codes as INT8 (1 byte per weight instead of 4) followed by Cast/Add/Mul, and the
dequantized weight equals the module's own ``dequantize()`` bit for bit.

    >>> qdq = qdq_equivalent(packed_linear)          # None when the module has no integer codes
    >>> torch.equal(qdq.weight(), packed_linear.dequantize())
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class WeightOnlyQDQ(nn.Module):
    """A Linear or Conv2d whose weight is int8 codes with per-group scale/zero, dequantized in forward.

    q: (out, cols) int8 = codes - 128; scale, zero: (out, G) with cols = G * group_size.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 shape: tuple[int, ...], conv: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("q", q.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.shape, self.conv = tuple(shape), conv

    def weight(self) -> torch.Tensor:
        out, cols = self.q.shape
        G = self.scale.shape[1]
        q = self.q.reshape(out, G, cols // G).float() + 128  # (out, G, gs): the codes
        W = self.scale[..., None] * (q - self.zero[..., None])  # same arithmetic as dequantize()
        return W.reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.conv is None:
            return F.linear(x, W, b)
        return F.conv2d(x, W, b, **self.conv)


def _codes(m: nn.Module) -> torch.Tensor | None:
    if callable(getattr(m, "codes", None)):
        return m.codes()
    q = getattr(m, "qweight", None)
    if isinstance(q, torch.Tensor) and q.dtype == torch.int8:
        return q.to(torch.int32) + 128
    return None


def qdq_equivalent(m: nn.Module) -> WeightOnlyQDQ | None:
    """A :class:`WeightOnlyQDQ` computing what packed module `m` computes, or None if `m` has no codes."""
    scale, zero = getattr(m, "scale", None), getattr(m, "zero", None)
    if not (isinstance(scale, torch.Tensor) and isinstance(zero, torch.Tensor) and scale.dim() == 2):
        return None
    codes = _codes(m)
    if codes is None or codes.dim() != 2 or codes.shape[1] % scale.shape[1] or int(codes.max()) > 255:
        return None
    bias = getattr(m, "bias", None)
    if hasattr(m, "in_features"):
        return WeightOnlyQDQ(codes - 128, scale, zero, bias, (m.out_features, m.in_features))
    if hasattr(m, "in_channels") and len(getattr(m, "kernel_size", ())) == 2:
        pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        conv = {"stride": tuple(m.stride), "padding": pad, "dilation": tuple(m.dilation), "groups": m.groups}
        cols = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        return WeightOnlyQDQ(codes[:, :cols] - 128, scale, zero, bias,
                             (m.out_channels, m.in_channels // m.groups, *m.kernel_size), conv)
    return None
