"""Dynamic int8 Linear: int8 weights (per output channel) and activations quantized per call.

``y = s_x s_w (x_q q_w^T - zp_w * rowsum(x_q)) + b`` with an integer GEMM. Two backends:

- ``fbgemm``: ``quantized::linear_dynamic`` (PyTorch's x86 int8 GEMM; activations quantized per
  tensor with a 7-bit range, ``reduce_range=True``, safe on CPUs without VNNI). The packed weight
  is built on the first CPU forward and cached (it is not part of ``state_dict``).
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32, CPU and CUDA) with activations quantized
  symmetrically per row (token); used where fbgemm is unavailable.

State is plain tensors: ``qweight`` int8 N x K (``q - 128``), ``scale``/``zero`` float32 N x 1.

    >>> m = DynamicInt8Linear.from_linear(nn.Linear(128, 64), rtn=True)
    >>> y = m(torch.randn(4, 128)); m.kernel
    'quantized::linear_dynamic (fbgemm, int8 activations per tensor)'
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import register_module_format
from .codes import GridCodes
from .packed import CachedKernel, weight_codes

BACKENDS = ("auto", "fbgemm", "int_mm")


def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


@register_module_format("dynamic_int8_linear")
class DynamicInt8Linear(CachedKernel):
    """Linear with int8 weights and dynamically quantized int8 activations.

    >>> m = DynamicInt8Linear.from_linear(lin)          # lin's weight already on an 8-bit per-row grid
    >>> m.backend = "int_mm"                            # force the torch._int_mm path
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 backend: str = "auto", device: Any = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            from ..errors import ConfigError

            raise ConfigError(f"DynamicInt8Linear: backend={backend!r}; allowed: {list(BACKENDS)}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.bits, self.group_size = 8, in_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, 1, device=device))
        self.register_buffer("zero", torch.full((out_features, 1), 128.0, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def spec(self) -> dict[str, Any]:
        """JSON-safe constructor arguments (see :mod:`brainsurgeon.formats`)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "backend": self.backend}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DynamicInt8Linear:
        """An empty module with every buffer at its saved shape."""
        return cls(**spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, codes: GridCodes | None = None, *, rtn: bool = False,
                    sym: bool = True, mse: bool = True, backend: str = "auto", name: str = "") -> DynamicInt8Linear:
        """Pack a float Linear whose weight is on an 8-bit per-row grid (or round it: rtn=True)."""
        codes = codes or weight_codes(linear, 8, 0, rtn, sym, name, mse)
        if codes.bits != 8 or codes.scale.shape[1] != 1:
            from ..errors import ConfigError

            raise ConfigError(f"layer {name or '?'}: DynamicInt8Linear needs 8-bit codes with one group per "
                              f"output channel (got {codes.bits}-bit, {codes.scale.shape[1]} groups); "
                              f"quantize with bits=8, group_size=0")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, backend,
                device=linear.weight.device)
        m.qweight.copy_((codes.q - 128).to(torch.int8))
        m.scale.copy_(codes.scale)
        m.zero.copy_(codes.zero)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``scale * (q - zero)``."""
        return self.scale * (self.qweight.float() + 128 - self.zero)

    def _resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "fbgemm" if self.qweight.device.type == "cpu" and _fbgemm_available() else "int_mm"

    @property
    def kernel(self) -> str:
        """The compute path forward takes (shown in reports)."""
        if self._resolved_backend() == "fbgemm":
            return "quantized::linear_dynamic (fbgemm, int8 activations per tensor)"
        return "torch._int_mm (int8 activations per row)"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self._resolved_backend() == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x2, self._fbgemm_weight(), True)
        else:
            y = self._int_mm(x2)
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _fbgemm_weight(self) -> Any:
        if "fbgemm" not in self._cache:
            zp = (self.zero[:, 0] - 128).to(torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated in torch; the op is not
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scale[:, 0].double(), zp, 0)
                self._cache["fbgemm"] = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._cache["fbgemm"]

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        # x: M x K float32 -> per-row symmetric int8
        sx = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # M x 1
        xq = torch.clamp(torch.round(x / sx), -127, 127).to(torch.int8)
        M = xq.shape[0]
        pad = 17 - M if xq.device.type == "cuda" and M <= 16 else 0  # CUDA _int_mm needs M > 16
        if pad:
            xq = F.pad(xq, (0, 0, 0, pad))
        if "wt" not in self._cache:
            self._cache["wt"] = self.qweight.t().contiguous()  # K x N
        acc = torch._int_mm(xq, self._cache["wt"])[:M]  # M x N int32
        zp = (self.zero[:, 0] - 128)  # N
        acc = acc.float() - xq[:M].float().sum(dim=1, keepdim=True) * zp
        return acc * sx * self.scale[:, 0]
