"""CompressionReport: per-layer rows, totals and model-level metrics, as a table, JSON, PNG plots or HTML.

    >>> rep = CompressionReport()
    >>> rep.add_row(LayerRow(name="fc1", method="ExactOBS 75% unstructured", shape=(64, 128),
    ...                      params=8192, nonzeros=2048, bits=32.0, loss=0.1, rel_loss=0.01, seconds=0.2))
    >>> rep.add_metric("accuracy", before=0.981, after=0.975)
    >>> rep.add_point("obs75", cost=0.25, quality=0.975)      # one point of an accuracy-vs-cost sweep
    >>> text = rep.to_table()           # the library never prints; the CLI does
    >>> rep.plot("out/plots"); rep.to_html("out/report.html")  # matplotlib, imported only here
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ._io import atomic_open


@dataclass
class LayerRow:
    """What one compression step did to one layer (all numbers measured, none estimated)."""

    name: str
    method: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    bits: float  # bits per stored weight value (32 for fp32, k for a k-bit grid)
    loss: float  # tr(dW H dW^T) with the layer's calibration Hessian H = 2 X X^T / n
    rel_loss: float  # loss / tr(W H W^T) = ||dW X||^2 / ||W X||^2 on the calibration inputs
    seconds: float
    damp_retries: int = 0
    dead_inputs: int = 0
    levels: int = 0  # max distinct values per row (quantization), 0 if not quantized
    rank: int = 0  # rank of a low-rank factorization, 0 if not factorized
    bytes: int = 0  # bytes of the layer's stored state after this step (0: not measured)
    macs: int = 0  # multiply-accumulates per sample after this step (0: not measured)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / max(self.params, 1)


@dataclass
class CompressionReport:
    """Per-layer rows plus before/after metrics. Rows of later steps follow earlier ones.

    ``points`` are whole-model results of several runs (e.g. a budget sweep), each
    ``{"label", "cost", "quality", "cost_name", "quality_name"}``: the accuracy-vs-cost plot.
    """

    rows: list[LayerRow] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)

    def add_row(self, row: LayerRow) -> None:
        self.rows.append(row)

    def add_metric(self, name: str, before: float | None = None, after: float | None = None) -> None:
        """Record a model-level metric (e.g. accuracy, latency_ms_b1) before and/or after compression."""
        m = self.metrics.setdefault(name, {})
        if before is not None:
            m["before"] = float(before)
        if after is not None:
            m["after"] = float(after)

    def add_point(self, label: str, cost: float, quality: float, cost_name: str = "relative cost",
                  quality_name: str = "accuracy", **measures: float) -> None:
        """Record one whole-model result for the accuracy-vs-cost (Pareto) plot.

        measures: more numbers of the run shown beside it, e.g. ``ci_low``/``ci_high`` (a 95 %
        interval of the quality, drawn as error bars), ``agreement`` (top-1 agreement with the dense
        model), ``kl`` (mean KL(dense || run)): they separate runs whose accuracy ties.

        >>> rep.add_point("obs50+int4", cost=0.14, quality=0.972, cost_name="bytes / dense bytes")
        >>> rep.add_point("obq4", cost=0.17, quality=0.994, ci_low=0.98, ci_high=0.998, agreement=0.997, kl=0.004)
        """
        self.points.append({"label": str(label), "cost": float(cost), "quality": float(quality),
                            "cost_name": str(cost_name), "quality_name": str(quality_name),
                            **{k: float(v) for k, v in measures.items()}})

    def extend(self, other: CompressionReport) -> None:
        """Append another report's rows, metrics, notes and points (later values win)."""
        self.rows.extend(other.rows)
        for k, v in other.metrics.items():
            self.metrics.setdefault(k, {}).update(v)
        self.notes.extend(other.notes)
        self.points.extend(other.points)

    def final_rows(self) -> list[LayerRow]:
        """The last row of each layer, in first-seen order (the layer's final state)."""
        last: dict[str, LayerRow] = {}
        for r in self.rows:
            last[r.name] = r
        return list(last.values())

    def totals(self) -> dict[str, float]:
        """Totals over the final state of every layer (the last row per layer name)."""
        last = self.final_rows()
        params = sum(r.params for r in last)
        nnz = sum(r.nonzeros for r in last)
        weight_bits = sum(r.nonzeros * r.bits for r in last)
        return {
            "layers": len(last),
            "params": params,
            "nonzeros": nnz,
            "sparsity": 1.0 - nnz / max(params, 1),
            "avg_bits": weight_bits / max(nnz, 1),
            "seconds": sum(r.seconds for r in self.rows),
            "damp_retries": sum(r.damp_retries for r in self.rows),
            "bytes": sum(r.bytes for r in last),
            "macs": sum(r.macs for r in last),
        }

    def to_table(self) -> str:
        """A fixed-width text table: one line per layer step, then totals, metrics and notes.

        The rank, bytes and MACs columns appear when some row has them.
        """
        opt = [(k, w) for k, w in (("rank", 5), ("bytes", 10), ("macs", 11)) if any(getattr(r, k) for r in self.rows)]
        head = (f"{'layer':<26} {'method':<30} {'params':>9} {'sparsity':>8} {'bits':>5} "
                + "".join(f"{k if k != 'macs' else 'MACs':>{w}} " for k, w in opt)
                + f"{'loss':>9} {'rel.err':>9} {'sec':>7} {'retry':>5}")
        lines = [head, "-" * len(head)]

        def opt_cells(vals: dict[str, Any]) -> str:
            return "".join(f"{_count(vals[k]) if vals[k] else '-':>{w}} " for k, w in opt)

        for r in self.rows:
            lines.append(f"{r.name[:26]:<26} {r.method[:30]:<30} {r.params:>9} {r.sparsity:>8.1%} "
                         f"{r.bits:>5.1f} " + opt_cells(dataclasses.asdict(r))
                         + f"{r.loss:>9.2e} {r.rel_loss:>9.2e} {r.seconds:>7.2f} {r.damp_retries:>5}")
        t = self.totals()
        lines.append("-" * len(head))
        lines.append(f"{'total':<26} {'':<30} {t['params']:>9} {t['sparsity']:>8.1%} {t['avg_bits']:>5.1f} "
                     + opt_cells({"rank": 0, "bytes": t["bytes"], "macs": t["macs"]})
                     + f"{'':>9} {'':>9} {t['seconds']:>7.2f} {t['damp_retries']:>5}")
        for name, m in self.metrics.items():
            b, a = m.get("before"), m.get("after")
            parts = [f"before {b:.4f}" if b is not None else "", f"after {a:.4f}" if a is not None else ""]
            if b is not None and a is not None:
                parts.append(f"delta {a - b:+.4f}")
            lines.append(f"{name}: " + "  ".join(p for p in parts if p))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dataclasses.asdict(r) for r in self.rows], "totals": self.totals(),
                "metrics": self.metrics, "notes": self.notes, "points": self.points}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a saved report.json); unknown keys are ignored.

        >>> CompressionReport.from_dict(json.load(open("out/report.json"))).to_table()
        """
        names = {f.name for f in dataclasses.fields(LayerRow)}
        rows = [LayerRow(**{**{k: v for k, v in r.items() if k in names}, "shape": tuple(r.get("shape", ()))})
                for r in d.get("rows", [])]
        return cls(rows=rows, metrics={k: dict(v) for k, v in d.get("metrics", {}).items()},
                   notes=list(d.get("notes", [])), points=[dict(p) for p in d.get("points", [])])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str) -> None:
        """Write the JSON report atomically (temp file in the same folder, then rename)."""
        write_atomic(path, self.to_json())

    def measure(self, model: Any, example_inputs: Any = None) -> None:
        """Fill ``bytes`` (stored state of each layer's module) and, given inputs, ``macs`` per sample
        into the final row of every layer, measured on `model` as it is now.

        >>> rep.measure(model, torch.zeros(1, 1, 8, 8))
        """
        from .plots import measure_layers

        bytes_, macs = measure_layers(model, [r.name for r in self.final_rows()], example_inputs)
        for r in self.final_rows():
            r.bytes = bytes_.get(r.name, r.bytes)
            r.macs = macs.get(r.name, r.macs)

    def plot(self, folder: str) -> list[str]:
        """Write the PNG plots that apply to this report into `folder`; returns their paths.

        Per-layer sparsity/bits(/rank) bars always; accuracy-vs-cost Pareto front with two or more
        points; latency bars when a metric's name contains "latency".

        >>> rep.plot("out/plots")
        ['out/plots/layers.png', 'out/plots/latency.png']
        """
        from .plots import plot_report

        return plot_report(self, folder)

    def to_html(self, path: str, title: str = "brainsurgeon compression report") -> str:
        """Write one self-contained HTML page (tables + base64-embedded plots, no network) atomically.

        >>> rep.to_html("out/report.html")
        'out/report.html'
        """
        from .report_html import write_html

        return write_html(self, path, title)


def _count(n: float) -> str:
    """Compact integer: 512, 12.3k, 4.56M, 7.89G."""
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suf}"
    return f"{int(n)}"


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically (see :func:`brainsurgeon._io.atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)
