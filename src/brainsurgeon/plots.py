"""The report's pictures: per-layer bars, the accuracy-vs-cost Pareto front, latency bars (HTML: report_html).

matplotlib is imported inside the functions (``pip install 'brainsurgeon[plot]'``) and used through
``matplotlib.figure.Figure`` only: no pyplot, no global state, no display needed::

    >>> paths = plot_report(report, "out/plots")      # ['out/plots/layers.png', ...]
    >>> pareto_front([{"cost": 1, "quality": .9}, {"cost": 2, "quality": .8}])
    [0]
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ._io import atomic_open
from ._modes import eval_mode
from .errors import MissingDataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class ReportLike(Protocol):
    """What the plots read from a report (``report.CompressionReport`` is one; this module never imports it,
    so the dependency runs one way: report -> plots)."""

    rows: list[Any]
    metrics: dict[str, dict[str, float]]
    points: list[dict[str, Any]]
    notes: list[str]

    def final_rows(self) -> list[Any]: ...

    def totals(self) -> dict[str, float]: ...


def pareto_front(points: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point dominates (cost <= and quality >= with one strict), by cost.

    >>> pareto_front([{"cost": 1, "quality": 0.9}, {"cost": 2, "quality": 0.95}, {"cost": 3, "quality": 0.9}])
    [0, 1]
    """
    def dominated(i: int) -> bool:
        a = points[i]
        return any(b["cost"] <= a["cost"] and b["quality"] >= a["quality"]
                   and (b["cost"] < a["cost"] or b["quality"] > a["quality"]) for b in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i]["cost"], i))


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDataError("plots need matplotlib; pip install 'brainsurgeon[plot]'") from e
    return Figure(figsize=(width, height), layout="constrained")


def layers_figure(report: ReportLike) -> Figure:
    """Bars per layer (final state): sparsity %, bits per weight, and rank when any layer is factorized."""
    rows = report.final_rows()
    names = [r.name for r in rows]
    panels = [("sparsity (%)", [100 * r.sparsity for r in rows], "tab:blue"),
              ("bits / weight", [r.bits for r in rows], "tab:orange")]
    if any(r.rank for r in rows):
        panels.append(("rank", [r.rank for r in rows], "tab:green"))
    fig = _figure(min(max(2 + 0.35 * len(rows), 6), 40), 1.2 + 2.0 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    x = list(range(len(rows)))
    for ax, (label, vals, color) in zip(axes, panels, strict=True):
        ax.bar(x, vals, color=color)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 100)
    axes[-1].set_xticks(x, names, rotation=90, fontsize=max(4, 9 - len(rows) // 40))
    axes[0].set_title(f"per-layer compression ({len(rows)} layers)")
    return fig


def _merged_labels(points: Sequence[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """One label per distinct (cost, quality): runs that tie are named together ("RTN / OBQ")."""
    at: dict[tuple[float, float], list[str]] = {}
    for p in points:
        at.setdefault((round(p["cost"], 9), round(p["quality"], 9)), []).append(str(p.get("label", "")))
    return [(c, q, " / ".join(n for n in names if n)) for (c, q), names in at.items()]


# candidate label offsets in points (dx, dy, horizontal alignment), tried in order until one is free
_OFFSETS = [(5, 5, "left"), (5, -12, "left"), (-5, 5, "right"), (-5, -12, "right"), (5, 16, "left"),
            (5, -23, "left"), (-5, 16, "right"), (-5, -23, "right"), (5, 27, "left"), (5, -34, "left"),
            (-5, 27, "right"), (-5, -34, "right")]


def place_labels(ax: Any, labels: Sequence[tuple[float, float, str]], fontsize: float = 8) -> list[Any]:
    """Annotate each (x, y, text) at the first offset whose text box overlaps no earlier label (greedy).

    Boxes are measured with an Agg renderer after the layout is computed; a label with no free
    offset keeps the first one. Returns the annotations.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.figure
    FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    out = []
    for x, y, text in sorted(labels, key=lambda t: (t[0], -t[1])):
        ann = None
        for dx, dy, ha in _OFFSETS:
            if ann is not None:
                ann.remove()
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=fontsize)
            box = ann.get_window_extent(renderer).expanded(1.05, 1.15)
            inside = ax.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed) and inside.contains(box.x0, box.y0) \
                    and inside.contains(box.x1, box.y1):
                break
        else:
            ann.remove()
            dx, dy, ha = _OFFSETS[0]
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=fontsize)
            box = ann.get_window_extent(renderer)
        placed.append(box)
        out.append(ann)
    return out


def pareto_figure(points: Sequence[dict[str, Any]]) -> Figure:
    """All points (cost vs quality) with the Pareto front drawn as a step line; labels never overlap.

    Points carrying ``ci_low``/``ci_high`` (a confidence interval of the quality) get error bars.
    """
    front = pareto_front(points)
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    xs, ys = [p["cost"] for p in points], [p["quality"] for p in points]
    if all("ci_low" in p and "ci_high" in p for p in points):
        err = [[q - p["ci_low"] for p, q in zip(points, ys, strict=True)],
               [p["ci_high"] - q for p, q in zip(points, ys, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="0.75", capsize=3, label="95% interval")
    ax.scatter(xs, ys, color="0.6", label="runs")
    fx, fy = [points[i]["cost"] for i in front], [points[i]["quality"] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", label="Pareto front")
    ax.scatter(fx, fy, color="tab:red", zorder=3)
    ax.set_xlabel(points[0].get("cost_name", "cost"))
    ax.set_ylabel(points[0].get("quality_name", "quality"))
    ax.set_title("accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.3)  # room for the labels inside the axes
    ax.legend(loc="lower right", fontsize=8)
    place_labels(ax, _merged_labels(points))
    return fig


def latency_metrics(report: ReportLike) -> dict[str, dict[str, float]]:
    """The report's metrics whose name contains "latency" (before and/or after)."""
    return {k: v for k, v in report.metrics.items() if "latency" in k.lower() and v}


def latency_figure(metrics: dict[str, dict[str, float]]) -> Figure:
    """One panel per latency metric (own scale): before/after bars, the speed-up (before / after) in the title."""
    fig = _figure(max(4, 2.6 * len(metrics)), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (name, m) in zip(axes, metrics.items(), strict=True):
        keys = [k for k in ("before", "after") if k in m]
        ax.bar(keys, [m[k] for k in keys], color=["tab:gray" if k == "before" else "tab:green" for k in keys])
        speed = ""
        if m.get("before") and m.get("after"):
            r = m["before"] / m["after"]
            speed = f"\n{r:.2f}x faster" if r >= 1 else f"\n{1 / r:.2f}x slower"
        ax.set_title(f"{name}{speed}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("latency")
    return fig


def figures(report: ReportLike) -> dict[str, Figure]:
    """name -> figure for every plot that applies to `report` (layers when it has rows)."""
    out: dict[str, Figure] = {}
    if report.rows:
        out["layers"] = layers_figure(report)
    if len(report.points) >= 2:
        out["pareto"] = pareto_figure(report.points)
    lat = latency_metrics(report)
    if lat:
        out["latency"] = latency_figure(lat)
    return out


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (no creation-time metadata, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def plot_report(report: ReportLike, folder: str) -> list[str]:
    """Write ``<name>.png`` into `folder` (atomically, one file at a time) for every applicable plot."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, fig in figures(report).items():
        path = os.path.join(folder, f"{name}.png")
        with atomic_open(path, "wb") as f:
            f.write(png_bytes(fig))
        paths.append(path)
    return paths


def _module_macs(m: Any, out: Any) -> int:
    """Dense-equivalent multiply-accumulates of one leaf compute module for its output `out`."""
    if not hasattr(out, "numel"):
        return 0
    if hasattr(m, "in_features") and hasattr(m, "out_features"):
        return out.numel() // max(m.out_features, 1) * m.in_features * m.out_features
    if hasattr(m, "in_channels") and hasattr(m, "kernel_size") and hasattr(m, "groups"):
        k = 1
        for s in (m.kernel_size if isinstance(m.kernel_size, (tuple, list)) else (m.kernel_size,)):
            k *= s
        return out.numel() * (m.in_channels // m.groups) * k
    if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:  # HF GPT-2 style
        nx, nf = m.weight.shape
        return out.numel() // nf * nx * nf
    return 0


def measure_layers(model: Any, names: list[str], example_inputs: Any = None) -> tuple[dict[str, int], dict[str, int]]:
    """Stored bytes of each named module, and (given inputs) its MACs per sample from one forward.

    MACs are dense-equivalent for the module's current shapes (structural pruning and low-rank
    factors change them; unstructured zeros do not). The model's train/eval mode is restored.

    >>> measure_layers(model, ["fc1"], torch.zeros(1, 1, 8, 8))
    ({'fc1': 131328}, {'fc1': 32768})
    """
    import torch

    mods = dict(model.named_modules())
    bytes_: dict[str, int] = {}
    for n in names:
        if n in mods:
            seen: set[tuple[int, int]] = set()
            total = 0
            for t in mods[n].state_dict().values():
                key = (t.untyped_storage().data_ptr(), t.storage_offset())
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
            bytes_[n] = total
    macs: dict[str, int] = {}
    if example_inputs is None:
        return bytes_, macs
    counts: dict[str, int] = {}
    leaves = {n: m for n, m in mods.items() if n and not any(True for _ in m.children())}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: counts.__setitem__(n, counts.get(n, 0)
                                                                                   + _module_macs(mod, out)))
             for n, m in leaves.items()]
    try:
        with eval_mode(model), torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
                first = next((v for v in example_inputs.values() if isinstance(v, torch.Tensor)), None)
            else:
                args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
                model(*args)
                first = next((v for v in args if isinstance(v, torch.Tensor)), None)
    finally:
        for h in hooks:
            h.remove()
    batch = int(first.shape[0]) if first is not None and first.dim() else 1
    for n in names:
        if n in mods:
            macs[n] = sum(c for k, c in counts.items() if k == n or k.startswith(n + ".")) // max(batch, 1)
    return bytes_, macs
