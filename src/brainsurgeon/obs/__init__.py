"""The Optimal Brain Surgeon engine: exact (OBC) and fast (SparseGPT/GPTQ) layer-wise solvers.

    >>> from brainsurgeon.obs import compress_weight
    >>> res = compress_weight(W, H, ExactOBS(sparsity=0.5))
"""

from . import baselines, exact, fast  # noqa: F401  (register the solvers)
from .engine import compress_weight, is_data_free, register_solver
from .result import LayerResult

__all__ = ["LayerResult", "compress_weight", "is_data_free", "register_solver"]
