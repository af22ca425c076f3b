"""DepGraph: trace -> coupled dims -> groups -> verified surgery (structural pruning of any architecture).

    >>> from brainsurgeon.graph import DependencyGraph
    >>> g = DependencyGraph(model, example_inputs=(x,))
    >>> grp = g.group(model.conv1, dim="out", idxs=[0, 2, 6])
    >>> print(grp); grp.prune()

Extension points: :func:`register_rule` (an ATen op's index maps), :func:`register_fixer`
(module attributes after slicing).
"""

from .graph import DEFAULT_ROOTS, DependencyGraph, slice_role
from .group import Group, Slice
from .history import load_history, replay, save_history
from .rules import register_rule, registered_rules
from .surgery import register_fixer
from .trace import trace_model

__all__ = [
    "DEFAULT_ROOTS", "DependencyGraph", "Group", "Slice", "load_history", "register_fixer", "register_rule",
    "registered_rules", "replay", "save_history", "slice_role", "trace_model",
]
