"""The report's pictures: per-layer bars, the accuracy-vs-cost Pareto front, latency bars, one HTML page.

matplotlib is imported inside the functions (``pip install 'brainsurgeon[plot]'``) and used through
``matplotlib.figure.Figure`` only: no pyplot, no global state, no display needed::

    >>> paths = plot_report(report, "out/plots")      # ['out/plots/layers.png', ...]
    >>> write_html(report, "out/report.html")         # plots embedded as base64 PNGs, no network
    >>> pareto_front([{"cost": 1, "quality": .9}, {"cost": 2, "quality": .8}])
    [0]
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._io import atomic_open
from .errors import MissingDataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .report import CompressionReport


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


def layers_figure(report: CompressionReport) -> Figure:
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


def pareto_figure(points: Sequence[dict[str, Any]]) -> Figure:
    """All points (cost vs quality) with the Pareto front drawn as a step line and labelled."""
    front = pareto_front(points)
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    ax.scatter([p["cost"] for p in points], [p["quality"] for p in points], color="0.6", label="runs")
    fx, fy = [points[i]["cost"] for i in front], [points[i]["quality"] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", label="Pareto front")
    ax.scatter(fx, fy, color="tab:red", zorder=3)
    for p in points:
        ax.annotate(p.get("label", ""), (p["cost"], p["quality"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel(points[0].get("cost_name", "cost"))
    ax.set_ylabel(points[0].get("quality_name", "quality"))
    ax.set_title("accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def latency_metrics(report: CompressionReport) -> dict[str, dict[str, float]]:
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


def figures(report: CompressionReport) -> dict[str, Figure]:
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


def plot_report(report: CompressionReport, folder: str) -> list[str]:
    """Write ``<name>.png`` into `folder` (atomically, one file at a time) for every applicable plot."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, fig in figures(report).items():
        path = os.path.join(folder, f"{name}.png")
        with atomic_open(path, "wb") as f:
            f.write(png_bytes(fig))
        paths.append(path)
    return paths


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:2px 8px;text-align:right;font-size:13px}"
        "th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}"
        "figure{margin:1em 0}")


def _table(head: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def render_html(report: CompressionReport, title: str = "brainsurgeon compression report") -> str:
    """The report as one self-contained HTML page: summary, metrics, embedded plots, per-layer table, notes."""
    from . import __version__

    t = report.totals()
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", "<h2>Summary</h2>",
             _table(["layers", "params", "nonzeros", "sparsity", "avg bits", "bytes", "MACs / sample", "seconds"],
                    [[t["layers"], t["params"], t["nonzeros"], f"{t['sparsity']:.1%}", f"{t['avg_bits']:.2f}",
                      t["bytes"] or "-", t["macs"] or "-", f"{t['seconds']:.2f}"]], left=0)]
    if report.metrics:
        parts.append("<h2>Metrics</h2>")
        rows = []
        for name, m in report.metrics.items():
            b, a = m.get("before"), m.get("after")
            rows.append([name, "-" if b is None else f"{b:.4f}", "-" if a is None else f"{a:.4f}",
                         f"{a - b:+.4f}" if a is not None and b is not None else "-"])
        parts.append(_table(["metric", "before", "after", "delta"], rows))
    figs = figures(report)
    if figs:
        parts.append("<h2>Plots</h2>")
        captions = {"layers": "Per-layer sparsity, bits (and rank) in the final state of each layer",
                    "pareto": "Accuracy vs cost; the red step line is the Pareto front",
                    "latency": "Measured latency before and after compression"}
        for name, fig in figs.items():
            data = base64.b64encode(png_bytes(fig)).decode("ascii")
            parts.append(f"<figure id=\"{name}\"><img alt=\"{name} plot\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
    if report.points:
        parts.append("<h2>Runs</h2>")
        front = set(pareto_front(report.points))
        parts.append(_table(["run", report.points[0]["cost_name"], report.points[0]["quality_name"], "Pareto"],
                            [[p["label"], f"{p['cost']:.4g}", f"{p['quality']:.4f}", "yes" if i in front else ""]
                             for i, p in enumerate(report.points)]))
    if report.rows:
        parts.append("<h2>Layers</h2>")
        parts.append(_table(
            ["layer", "method", "shape", "params", "sparsity", "bits", "rank", "bytes", "MACs", "loss", "rel.err",
             "seconds", "damp retries"],
            [[r.name, r.method, "x".join(map(str, r.shape)), r.params, f"{r.sparsity:.1%}", f"{r.bits:.1f}",
              r.rank or "-", r.bytes or "-", r.macs or "-", f"{r.loss:.3e}", f"{r.rel_loss:.3e}", f"{r.seconds:.2f}",
              r.damp_retries] for r in report.rows], left=2))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append(f"<footer><small>brainsurgeon {html.escape(__version__)}</small></footer></body></html>")
    return "\n".join(parts)


def write_html(report: CompressionReport, path: str, title: str = "brainsurgeon compression report") -> str:
    """Write :func:`render_html` to `path` atomically; returns `path`."""
    text = render_html(report, title)
    with atomic_open(path, "w") as f:
        f.write(text)
    return path


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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
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
        model.train(was_training)
    batch = int(first.shape[0]) if first is not None and first.dim() else 1
    for n in names:
        if n in mods:
            macs[n] = sum(c for k, c in counts.items() if k == n or k.startswith(n + ".")) // max(batch, 1)
    return bytes_, macs
