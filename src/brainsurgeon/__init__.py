"""brainsurgeon: compress trained PyTorch models and prove it with measurements.

    >>> import brainsurgeon as bs
    >>> report = bs.sparsify_(model, bs.ExactOBS(sparsity=0.75), calib=loader)
    >>> report.extend(bs.prune_(model, bs.ChannelPruning(ratio=0.3), example_inputs=x))
    >>> bs.save(model, "out/ckpt"); print(report.to_table())

Importing this package does no work: no CUDA, no torch flags, no transformers import.
"""

from importlib.metadata import PackageNotFoundError, version

from .api import compress, plan_layers, quantize_, sparsify_
from .config import (
    GPTQ,
    OBQ,
    RTN,
    W8A8,
    ActQuant,
    CalibOptions,
    ExactOBS,
    Magnitude,
    Recipe,
    SparseGPT,
    Step,
    dump_recipe,
    load_recipe,
)
from .distill import KD, distill
from .errors import (
    BrainsurgeonError,
    BudgetInfeasibleError,
    CalibrationError,
    ConfigError,
    FormatError,
    NumericalError,
    SurgeryError,
    UnsupportedModuleError,
    UnsupportedOpError,
)
from .export import export_onnx, from_pretrained, load, save, save_pretrained
from .graph import DependencyGraph, Group, Slice
from .lowrank import LowRank, Separable, factorize_, transform_
from .prune import BNL1, ChannelPruning, GroupNormRegularizer, prune_
from .quant import Pack, pack_
from .quant.qat import QAT, convert_qat_, prepare_qat_
from .report import CompressionReport, LayerRow
from .search import AMC, Budget, Plan, SearchSpace, apply_plan_, search
from .share import WeightSharing, share_

try:
    __version__ = version("brainsurgeon")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    # layer-wise OBS compression (OBC, SparseGPT, GPTQ) and recipes
    "GPTQ", "OBQ", "RTN", "W8A8", "ActQuant", "CalibOptions", "ExactOBS", "Magnitude", "Recipe", "SparseGPT", "Step",
    "compress", "dump_recipe", "load_recipe", "plan_layers", "quantize_", "sparsify_",
    # structural pruning (DepGraph)
    "BNL1", "ChannelPruning", "DependencyGraph", "Group", "GroupNormRegularizer", "Slice", "prune_",
    # the classic toolbox
    "KD", "QAT", "LowRank", "Pack", "WeightSharing", "convert_qat_", "distill", "factorize_", "pack_",
    "prepare_qat_", "share_",
    # compact-design transforms (spatial / depthwise separable, bottleneck)
    "Separable", "transform_",
    # budgets and search
    "AMC", "Budget", "Plan", "SearchSpace", "apply_plan_", "search",
    # saving, loading, export, reports
    "CompressionReport", "LayerRow", "export_onnx", "from_pretrained", "load", "save", "save_pretrained",
    # errors
    "BrainsurgeonError", "BudgetInfeasibleError", "CalibrationError", "ConfigError", "FormatError",
    "NumericalError", "SurgeryError", "UnsupportedModuleError", "UnsupportedOpError",
    "__version__",
]
