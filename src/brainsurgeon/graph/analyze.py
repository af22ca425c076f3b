"""What a DependencyGraph sees in a model, as plain data (for the ``analyze`` CLI and notebooks).

    >>> info = analyze(model, (torch.randn(1, 3, 64, 64),), ignore=["fc"])
    >>> info["groups"][0]        # {'root': 'conv1.weight', 'dim': 0, 'n': 64, 'exact': True, 'slices': [...]}
    >>> print(format_analysis(info))
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from .graph import DependencyGraph


def analyze(model: nn.Module, example_inputs: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trace ``model``, list every prunable group (full width) and every blocked op, without pruning."""
    t0 = time.perf_counter()
    g = DependencyGraph(model, example_inputs, ignore=ignore)
    groups = g.groups()
    seconds = time.perf_counter() - t0
    return {
        "model": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "traces": [{"mode": t.mode, "ops": len(t.ops), "seconds": round(t.seconds, 4)} for t in g.traces],
        "seconds": round(seconds, 4),
        "groups": [{"root": grp.root.name, "dim": grp.root.dim, "n": grp.n, "exact": grp.exact,
                    "inexact_by": list(grp.inexact_by), "prunable_elements": grp.numel(),
                    "slices": [{"name": s.name, "dim": s.dim, "rows": int(s.idxs.shape[0]),
                                "per_row": int(s.idxs.shape[1]), "role": s.role} for s in grp.slices]}
                   for grp in groups],
        "ops_without_rule": dict(g.unsupported),
        "left_out": [{"set": what, "reason": why} for what, why in g.left_out],
        "report": g.report(),
    }


def format_analysis(info: dict[str, Any], verbose: bool = False) -> str:
    """A terminal table of :func:`analyze` output."""
    lines = [f"{info['model']}: {info['params']:,} parameters; "
             + ", ".join(f"{t['mode']} trace {t['ops']} ops in {t['seconds']:.3f}s" for t in info["traces"])
             + f"; {len(info['groups'])} groups ({info['seconds']:.2f}s)"]
    lines.append(f"  {'root':<48} {'dim':>3} {'n':>6} {'slices':>6} {'elements':>10}  exact")
    for grp in info["groups"]:
        exact = "yes" if grp["exact"] else "no: " + ", ".join(grp["inexact_by"])
        lines.append(f"  {grp['root']:<48} {grp['dim']:>3} {grp['n']:>6} {len(grp['slices']):>6} "
                     f"{grp['prunable_elements']:>10}  {exact}")
        if verbose:
            lines += [f"      {s['name']:<44} dim {s['dim']}  {s['rows']}x{s['per_row']}  {s['role']}"
                      for s in grp["slices"]]
    if info["ops_without_rule"]:
        lines.append("ops without a rule (they block pruning through every dim of their tensors):")
        lines += [f"  {name} x{c}" for name, c in info["ops_without_rule"].items()]
    if info["left_out"]:
        lines.append("not prunable:")
        lines += [f"  {x['set']}: {x['reason']}" for x in info["left_out"]]
    return "\n".join(lines)
