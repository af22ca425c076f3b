"""The report as one self-contained HTML page: summary, metrics, embedded plots, runs, per-layer table, notes.

Numbers are shown in the units a person reads: bytes as KB/MB, MACs as M/G, accuracies as
percentages with their 95 % interval, deltas in points; a cell that was not measured says so.
Dependencies run one way: report -> report_html -> plots.

    >>> write_html(report, "out/report.html")         # plots embedded as base64 PNGs, no network
    >>> human_bytes(195017), human_count(3_350_000)
    ('190.4 KB', '3.35 M')
"""

from __future__ import annotations

import base64
import html
from typing import Any

from ._io import atomic_open
from .plots import ReportLike, figures, pareto_front, png_bytes

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:2px 8px;text-align:right;font-size:13px;"
        "white-space:nowrap}"
        "th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}"
        "figure{margin:1em 0}")
NOT_MEASURED = "not measured"
EARLIER = "earlier step"  # bytes/MACs of a layer before its last step: only the final state is measured


def human_bytes(n: float) -> str:
    """1024-based: 512 B, 190.4 KB, 3.21 MB, 1.07 GB (signed for deltas)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for div, unit in ((1024**3, "GB"), (1024**2, "MB"), (1024, "KB")):
        if n >= div:
            v = n / div
            return f"{sign}{v:.3g} {unit}" if v >= 100 else f"{sign}{v:.1f} {unit}" if v >= 10 else \
                f"{sign}{v:.2f} {unit}"
    return f"{sign}{int(n)} B"


def human_count(n: float) -> str:
    """Compact count: 512, 12.3 k, 3.35 M, 7.89 G."""
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suf}"
    return f"{n:.4g}"


def _is_fraction_metric(name: str) -> bool:
    return any(k in name.lower() for k in ("accuracy", "agreement", "top1", "top-1"))


def metric_cells(name: str, before: float | None, after: float | None) -> list[str]:
    """[before, after, delta] of one metric, formatted by what its name says it measures."""
    low = name.lower()

    def one(v: float | None) -> str:
        if v is None:
            return ""
        if "bytes" in low:
            return human_bytes(v)
        if _is_fraction_metric(low):
            return f"{100 * v:.2f} %"
        if "macs" in low or "flops" in low or "params" in low:
            return human_count(v)
        return f"{v:.4g}"

    delta = ""
    if before is not None and after is not None:
        d = after - before
        if "bytes" in low:
            delta = f"{human_bytes(d)} ({after / before:.3g}x)" if before else human_bytes(d)
        elif _is_fraction_metric(low):
            delta = f"{100 * d:+.2f} pt"
        else:
            delta = f"{d:+.4g}" + (f" ({after / before:.3g}x)" if before and ("macs" in low or "latency" in low)
                                   else "")
    return [one(before), one(after), delta]


def _table(head: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


_RUN_EXTRAS = (("agreement", "agreement with dense", lambda v: f"{100 * v:.2f} %"),
               ("kl", "KL(dense || run)", lambda v: f"{v:.2e}"))


def _runs_table(points: list[dict[str, Any]]) -> str:
    front = set(pareto_front(points))
    qname = points[0]["quality_name"]
    pct = _is_fraction_metric(qname)
    ci = all("ci_low" in p for p in points)
    extras = [(k, h, f) for k, h, f in _RUN_EXTRAS if any(k in p for p in points)]
    head = ["run", points[0]["cost_name"], qname] + (["95 % interval"] if ci else []) + [h for _, h, _ in extras] \
        + ["Pareto"]
    rows = []
    for i, p in enumerate(points):
        q = f"{100 * p['quality']:.2f} %" if pct else f"{p['quality']:.4g}"
        row = [p["label"], f"{p['cost']:.3g}", q]
        if ci:
            row.append(f"{100 * p['ci_low']:.1f} - {100 * p['ci_high']:.1f} %" if pct
                       else f"{p['ci_low']:.4g} - {p['ci_high']:.4g}")
        row += [f(p[k]) if k in p else NOT_MEASURED for k, _, f in extras]
        rows.append(row + ["yes" if i in front else ""])
    return _table(head, rows)


def render_html(report: ReportLike, title: str = "brainsurgeon compression report") -> str:
    """The report as one self-contained HTML page (deterministic for a given report)."""
    from . import __version__

    t = report.totals()
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", "<h2>Summary</h2>",
             _table(["layers", "params", "nonzeros", "sparsity", "avg bits", "bytes", "MACs / sample", "seconds"],
                    [[t["layers"], human_count(t["params"]), human_count(t["nonzeros"]), f"{t['sparsity']:.1%}",
                      f"{t['avg_bits']:.2f}", human_bytes(t["bytes"]) if t["bytes"] else NOT_MEASURED,
                      human_count(t["macs"]) if t["macs"] else NOT_MEASURED, f"{t['seconds']:.2f}"]], left=0)]
    if report.metrics:
        parts.append("<h2>Metrics</h2>")
        rows = [[name, *metric_cells(name, m.get("before"), m.get("after"))] for name, m in report.metrics.items()]
        parts.append(_table(["metric", "before", "after", "change"], rows))
    figs = figures(report)
    if figs:
        parts.append("<h2>Plots</h2>")
        captions = {"layers": "Per-layer sparsity, bits (and rank) in the final state of each layer",
                    "pareto": "Accuracy vs cost; the red step line is the Pareto front (runs that tie share a "
                              "label; grey bars: 95 % intervals)",
                    "latency": "Measured latency before and after compression"}
        for name, fig in figs.items():
            data = base64.b64encode(png_bytes(fig)).decode("ascii")
            parts.append(f"<figure id=\"{name}\"><img alt=\"{name} plot\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
    if report.points:
        parts.append("<h2>Runs</h2>")
        parts.append(_runs_table(report.points))
    if report.rows:
        final = {id(r) for r in report.final_rows()}

        def measured(r: Any, v: int, fmt: Any) -> str:
            return fmt(v) if v else NOT_MEASURED if id(r) in final else EARLIER

        parts.append("<h2>Layers</h2>")
        parts.append(_table(
            ["layer", "method", "shape", "params", "sparsity", "bits", "rank", "bytes", "MACs", "loss", "rel.err",
             "seconds", "damp retries"],
            [[r.name, r.method, "x".join(map(str, r.shape)), human_count(r.params), f"{r.sparsity:.1%}",
              f"{r.bits:.1f}", r.rank or "full", measured(r, r.bytes, human_bytes),
              measured(r, r.macs, human_count), f"{r.loss:.3e}", f"{r.rel_loss:.3e}",
              f"{r.seconds:.2f}", r.damp_retries] for r in report.rows], left=2))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append(f"<footer><small>brainsurgeon {html.escape(__version__)}</small></footer></body></html>")
    return "\n".join(parts)


def write_html(report: ReportLike, path: str, title: str = "brainsurgeon compression report") -> str:
    """Write :func:`render_html` to `path` atomically; returns `path`."""
    text = render_html(report, title)
    with atomic_open(path, "w") as f:
        f.write(text)
    return path
