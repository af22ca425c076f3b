"""Sparse storage of pruned Linear weights: bitmask, CSR and BSR, with a real sparse matmul where one exists.

==========  ===========================================================  ====================================
format      buffers (N x K weight, nnz kept values)                      forward
==========  ===========================================================  ====================================
bitmask     ``mask`` uint8 N x ceil(K/8) (bit k%8 of byte k//8),          decode to dense + ``F.linear``
            ``values`` nnz (row-major)                                   (storage only, no speed-up)
csr         ``crow_indices`` int32 N+1, ``col_indices`` int32 nnz,        ``torch.sparse.mm`` (CSR x dense)
            ``values`` nnz
bsr         ``crow_indices`` int32 N/b+1, ``col_indices`` int32 nblocks,  BSR x dense matmul
            ``values`` nblocks x b x b (zero blocks dropped)
==========  ===========================================================  ====================================

Whether CSR/BSR beat dense depends on sparsity, shape and batch: ``bench/speedups.py`` measures
the break-even sparsity on the machine at hand (:func:`break_even`). 2:4 semi-structured sparsity
runs through ``torch.sparse.to_sparse_semi_structured`` on CUDA only (:func:`semi_structured_`)::

    >>> m = SparseLinear.from_linear(pruned_linear, "csr")
    >>> torch.allclose(m(x), pruned_linear(x), atol=1e-5); m.nbytes() < 4 * pruned_linear.weight.numel()
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModuleError
from ..formats import register_module_format

FORMATS = ("bitmask", "csr", "bsr")


def _bits(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool rows x cols -> uint8 rows x ceil(cols/8); column c is bit c % 8 of byte c // 8."""
    rows, cols = mask.shape
    m = F.pad(mask.to(torch.uint8), (0, (-cols) % 8)).reshape(rows, -1, 8)  # rows x bytes x 8
    return (m * _bits(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 rows x bytes -> bool rows x cols."""
    bits = (packed.unsqueeze(-1) & _bits(packed.device)) != 0  # rows x bytes x 8
    return bits.reshape(packed.shape[0], -1)[:, :cols]


@register_module_format("sparse_linear")
class SparseLinear(nn.Module):
    """A Linear whose weight is stored sparse (``format``: bitmask, csr or bsr with ``block`` x ``block``).

    >>> m = SparseLinear.from_linear(lin, "bsr", block=16)     # lin pruned in 16x16 blocks
    >>> m.kernel
    'BSR x dense matmul (torch sparse_bsr)'
    """

    def __init__(self, in_features: int, out_features: int, format: str, nnz: int, block: int = 1,
                 bias: bool = True, dtype: str = "float32", device: Any = None) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ConfigError(f"SparseLinear: format={format!r}; allowed: {list(FORMATS)}")
        b = block if format == "bsr" else 1
        if format == "bsr" and (b < 1 or in_features % b or out_features % b):
            raise ConfigError(f"SparseLinear({in_features} -> {out_features}): block={block} must divide both "
                              f"in_features and out_features for BSR; pick a block size that divides both, "
                              f"or use format='csr'")
        self.in_features, self.out_features, self.format = in_features, out_features, format
        self.nnz, self.block, self.dtype_name = nnz, b, dtype
        dt = getattr(torch, dtype)
        i32 = {"dtype": torch.int32, "device": device}
        if format == "bitmask":
            self.register_buffer("mask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8,
                                                     device=device))
            self.register_buffer("values", torch.zeros(nnz, dtype=dt, device=device))
        elif format == "csr":
            self.register_buffer("crow_indices", torch.zeros(out_features + 1, **i32))
            self.register_buffer("col_indices", torch.zeros(nnz, **i32))
            self.register_buffer("values", torch.zeros(nnz, dtype=dt, device=device))
        else:  # nnz counts stored blocks
            self.register_buffer("crow_indices", torch.zeros(out_features // b + 1, **i32))
            self.register_buffer("col_indices", torch.zeros(nnz, **i32))
            self.register_buffer("values", torch.zeros(nnz, b, b, dtype=dt, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dt, device=device) if bias else None)

    def spec(self) -> dict[str, Any]:
        """JSON-safe constructor arguments (see :mod:`brainsurgeon.formats`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "format": self.format,
                "nnz": self.nnz, "block": self.block, "bias": self.bias is not None, "dtype": self.dtype_name}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SparseLinear:
        """An empty module with every buffer at its saved shape."""
        return cls(**spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "csr", block: int = 16) -> SparseLinear:
        """Store `linear`'s weight sparse: its exact zeros (entries, or whole blocks for bsr) are dropped.

        >>> SparseLinear.from_linear(lin, "bitmask").dense_weight().equal(lin.weight)
        True
        """
        W = linear.weight.detach()
        dt = str(W.dtype).removeprefix("torch.")
        if format == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                S = W.to_sparse_csr()
            nnz = S.values().numel()
        elif format == "bsr":
            if W.shape[0] % block or W.shape[1] % block:  # the constructor's error, before to_sparse_bsr
                return cls(W.shape[1], W.shape[0], "bsr", 0, block)
            S = W.to_sparse_bsr((block, block))
            nnz = S.values().shape[0]
        else:
            nnz = int((W != 0).sum())
        m = cls(W.shape[1], W.shape[0], format, nnz, block, linear.bias is not None, dt, device=W.device)
        if format == "bitmask":
            m.mask.copy_(pack_bits(W != 0))
            m.values.copy_(W[W != 0])
        else:
            m.crow_indices.copy_(S.crow_indices())
            m.col_indices.copy_(S.col_indices())
            m.values.copy_(S.values())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def sparse_weight(self) -> torch.Tensor:
        """The weight as a torch sparse CSR/BSR tensor (a view of the buffers, no copy)."""
        size = (self.out_features, self.in_features)
        if self.format == "csr":
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, size,
                                           check_invariants=False)
        if self.format == "bsr":
            return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values, size,
                                           check_invariants=False)
        raise ConfigError("SparseLinear: sparse_weight() needs format 'csr' or 'bsr'; use dense_weight()")

    def dense_weight(self) -> torch.Tensor:
        """The dense out_features x in_features weight."""
        if self.format == "bitmask":
            mask = unpack_bits(self.mask, self.in_features)
            W = torch.zeros(mask.shape, dtype=self.values.dtype, device=self.values.device)
            W[mask] = self.values
            return W
        return self.sparse_weight().to_dense()

    @property
    def kernel(self) -> str:
        """The compute path forward takes (shown in reports)."""
        return {"bitmask": "decode to dense + F.linear (storage only, no speed-up)",
                "csr": "CSR x dense matmul (torch.sparse.mm)",
                "bsr": "BSR x dense matmul (torch sparse_bsr)"}[self.format]

    @property
    def density(self) -> float:
        """Fraction of weights stored (blocks count in full for bsr)."""
        kept = self.nnz * self.block * self.block
        return kept / (self.in_features * self.out_features)

    def nbytes(self) -> int:
        """Bytes of the stored state (indices/mask + values + bias), as saved."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.format == "bitmask":
            y = F.linear(x2, self.dense_weight().to(x.dtype))
        else:  # y^T = W x^T: the sparse operand must come first
            y = torch.sparse.mm(self.sparse_weight(), x2.t().to(self.values.dtype)).t().to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format!r}, "
                f"density={self.density:.3f}, kernel={self.kernel!r}")


def sparsify_storage_(model: nn.Module, format: str = "csr", *, block: int = 16, min_sparsity: float = 0.0,
                      ignore: tuple[str, ...] = ()) -> dict[str, SparseLinear]:
    """Swap every nn.Linear with at least `min_sparsity` exact zeros for a SparseLinear, in place.

    >>> swapped = sparsify_storage_(model, "csr", min_sparsity=0.9)   # only where CSR pays off here
    """
    import re

    ign = [re.compile(p) for p in ignore]
    todo = {n: m for n, m in model.named_modules()
            if n and type(m) is nn.Linear and not any(p.fullmatch(n) for p in ign)
            and float((m.weight == 0).float().mean()) >= min_sparsity}
    new = {n: SparseLinear.from_linear(m, format, block) for n, m in todo.items()}  # validate first
    for n, m in new.items():
        model.set_submodule(n, m)
    return new


def break_even(sparsities: list[float], dense_s: float, sparse_s: list[float]) -> float | None:
    """The sparsity from which on the sparse time stays below dense, interpolated linearly.

    sparsities ascending. A noisy early dip below dense does not count: the crossing is the
    start of the run of winning sparsities that reaches the highest one measured. None if sparse
    loses at the highest sparsity; the lowest sparsity if it wins everywhere.

    >>> break_even([0.5, 0.7, 0.9], 1.0, [3.0, 2.0, 0.5])
    0.8333
    """
    if len(sparsities) != len(sparse_s) or not sparsities:
        raise ConfigError(f"break_even: {len(sparsities)} sparsities but {len(sparse_s)} timings")
    i = len(sparsities)
    while i > 0 and sparse_s[i - 1] < dense_s:
        i -= 1
    if i == len(sparsities):
        return None
    if i == 0:
        return sparsities[0]
    (s0, t0), (s1, t1) = (sparsities[i - 1], sparse_s[i - 1]), (sparsities[i], sparse_s[i])
    return round(s0 + (s1 - s0) * (t0 - dense_s) / (t0 - t1), 4)


def semi_structured_(linear: nn.Linear) -> nn.Linear:
    """Give a 2:4-pruned Linear a ``to_sparse_semi_structured`` weight (CUDA, fp16/bf16 only), in place.

    Raises UnsupportedModuleError on CPU: PyTorch has no CPU kernel for semi-structured sparsity.

    >>> semi_structured_(model.fc.half().cuda())
    """
    W = linear.weight.detach()
    if W.device.type != "cuda" or W.dtype not in (torch.float16, torch.bfloat16):
        raise UnsupportedModuleError(f"2:4 semi-structured sparsity needs a CUDA fp16/bf16 weight, got "
                                     f"{W.dtype} on {W.device.type}; PyTorch has no CPU kernel for it: "
                                     f"store the layer as SparseLinear('csr') or keep it dense on CPU")
    groups = (W.reshape(W.shape[0], -1, 4) != 0).sum(-1)
    if bool((groups > 2).any()):
        raise ConfigError("semi_structured_: weight is not 2:4 sparse (a group of 4 has > 2 nonzeros); "
                          "prune it with pattern='2:4' first")
    from torch.sparse import to_sparse_semi_structured

    linear.weight = nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
    return linear
