"""Modules whose parameters no traced forward reached: their couplings are unknown, so they block.

    >>> h = self.a(h) if x.mean() > 0 else self.b(h)    # traced on a positive x: b never runs
    >>> g = DependencyGraph(model, x)
    >>> g.untraced                                       # {'b': {8}}: the channel widths of b's parameters
    >>> print(g.report())                                # names b and every set it blocked

Which groups an untraced module would have joined is unknowable from the trace, so every group that
slices a dim of a width the module's parameters have (their dims 0 and 1: channels in and out) is left
out and named — the safe default, as for an op without a rule. Pass example inputs that run the module
(or ``train_inputs`` for a train-only branch) to prune those groups.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def untraced_widths(model: nn.Module, used: set[tuple[str, str]]) -> dict[str, set[int]]:
    """``{module name: channel widths}`` of modules with a parameter that no trace used (by any alias)."""
    seen: set[int] = set()
    used_ids = set()
    for mn, m in model.named_modules(remove_duplicate=False):
        for pn, p in m._parameters.items():
            if p is not None and (mn, pn) in used:
                used_ids.add(id(p))
    out: dict[str, set[int]] = {}
    for mn, m in model.named_modules():
        for p in m._parameters.values():
            if p is None or id(p) in used_ids or id(p) in seen or p.numel() == 0:
                continue
            seen.add(id(p))
            out.setdefault(mn, set()).update(int(p.shape[d]) for d in range(min(p.dim(), 2)) if p.shape[d] > 1)
    return {k: v for k, v in out.items() if v}


def untraced_hit(slices: Any, sizes: dict[tuple[str, str, int], int], untraced: dict[str, set[int]]) -> str | None:
    """Why a group (its ``slices``; ``sizes``: full size of each sliced dim) is blocked, or None."""
    widths = {sizes[(s.module, s.tensor, s.dim)] for s in slices}
    hit = sorted(name for name, w in untraced.items() if w & widths)
    if not hit:
        return None
    more = f" and {len(hit) - 1} more" if len(hit) > 1 else ""
    return (f"untraced module {hit[0]!r}{more} (its parameters were never reached by the example inputs, so "
            f"its coupling to these channels is unknown); pass inputs that run it, or train_inputs for a "
            f"train-only branch")
