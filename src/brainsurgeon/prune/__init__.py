"""Structural pruning: importance criteria, the channel pruner ``prune_``, group-sparsity regularisers.

    >>> from brainsurgeon.prune import ChannelPruning, prune_
    >>> rep = prune_(model, ChannelPruning(ratio=0.5, importance="group_l2", round_to=8), example_inputs=x)
    >>> print(rep.to_table())

Builds on :mod:`brainsurgeon.graph` (which channels are coupled, and the surgery) and on
:mod:`brainsurgeon.calib` (layer-input Hessians for the ``hessian``/``obs`` criteria and the OBS
reconstruction).
"""

from .api import PruneRow, prune_
from .config import ChannelPruning
from .costs import Costs, measure
from .heads import attention_roots, head_dim_sets, pair_groups
from .importance import (
    Stats,
    importance_needs,
    obs_saliency,
    register_importance,
    registered_importances,
    score,
)
from .reconstruct import reconstruct_, solve_reconstruction
from .regularize import BNL1, GroupNormRegularizer
from .select import keep_count, select_global, select_local
from .stats import collect_stats
from .table import prune_table

__all__ = [
    "BNL1", "ChannelPruning", "Costs", "GroupNormRegularizer", "PruneRow", "Stats", "attention_roots",
    "collect_stats", "head_dim_sets", "importance_needs", "keep_count", "measure", "obs_saliency",
    "pair_groups", "prune_", "prune_table", "reconstruct_", "register_importance", "registered_importances",
    "score", "select_global", "select_local", "solve_reconstruction",
]
