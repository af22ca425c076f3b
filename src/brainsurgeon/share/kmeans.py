"""1-D k-means weight clustering with zeros kept at zero (Han et al., ICLR 2016, sec. 3.1-3.2).

The nonzero weights w of a layer are clustered into k = 2^bits centroids c minimising
``sum_i |w_i - c_{l(i)}|^2`` by Lloyd's algorithm. In one dimension every cluster is an interval,
so assignment is a binary search over the midpoints of the sorted centroids. Pruned weights
(exact zeros) are left out and decode to exactly zero (label k)::

    >>> cb = cluster_weight(W, bits=4)
    >>> cb.centroids.shape, cb.labels.shape          # (16,), W.shape
    >>> W_shared = cb.weight()                       # centroids[labels], zeros where W was 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class Codebook:
    """k centroids (k,) and per-weight labels (W's shape, int64; label k = pruned zero)."""

    centroids: torch.Tensor
    labels: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.centroids.numel())

    def weight(self) -> torch.Tensor:
        """``[c_0 .. c_{k-1}, 0][labels]``: the shared weight tensor."""
        table = torch.cat([self.centroids, self.centroids.new_zeros(1)])  # (k + 1,)
        return table[self.labels]


def init_centroids(w: torch.Tensor, k: int, init: str = "linear") -> torch.Tensor:
    """k initial centroids for the values w (n,): evenly spaced over [min, max] or quantiles."""
    if init == "linear":
        return torch.linspace(float(w.min()), float(w.max()), k, dtype=w.dtype, device=w.device)
    if init == "density":
        q = torch.linspace(0, 1, k, dtype=w.dtype, device=w.device)
        return torch.quantile(w, q) if w.numel() <= 16_000_000 else torch.quantile(w[:: w.numel() // 16_000_000 + 1], q)
    raise ConfigError(f"init must be 'linear' or 'density', got {init!r}")


def assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value of w (n,); centroids (k,) sorted ascending."""
    mid = (centroids[1:] + centroids[:-1]) / 2  # (k - 1,) decision boundaries
    return torch.bucketize(w, mid)


def kmeans_1d(w: torch.Tensor, k: int, init: str = "linear", iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the values w (n,) into exactly k centroids: (centroids (k,), labels (n,)).

    Empty clusters keep their previous centroid, so the codebook always has k entries.

    >>> c, l = kmeans_1d(torch.tensor([0.1, 0.12, 0.9, 1.0]), 2)
    >>> c.tolist()
    [0.11..., 0.95...]
    """
    if w.numel() == 0:
        return torch.zeros(k, dtype=w.dtype, device=w.device), torch.zeros(0, dtype=torch.long, device=w.device)
    c = init_centroids(w, k, init)
    labels = assign(w, c)
    for _ in range(iters):
        sums = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, labels, w)
        counts = torch.bincount(labels, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        new = new.sort().values  # 1-D Lloyd keeps the order; sorting guards ties after empty clusters
        new_labels = assign(w, new)
        converged = torch.equal(new_labels, labels)
        c, labels = new, new_labels
        if converged:
            break
    return c, labels


def cluster_weight(W: torch.Tensor, bits: int, init: str = "linear", iters: int = 30) -> Codebook:
    """Cluster the nonzero entries of W into 2^bits centroids; zeros get label 2^bits.

    Computed in float32 (float64 for float64 weights) on W's device.

    >>> cb = cluster_weight(torch.randn(8, 8), bits=2); cb.k
    4
    """
    if not 1 <= bits <= 16:
        raise ConfigError(f"bits must be in [1, 16], got {bits}")
    k = 2 ** bits
    Wf = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    flat = Wf.reshape(-1)  # (numel,)
    nz = flat != 0
    c, l_nz = kmeans_1d(flat[nz], k, init, iters)
    labels = torch.full_like(flat, k, dtype=torch.long)
    labels[nz] = l_nz
    return Codebook(c, labels.reshape(W.shape))
