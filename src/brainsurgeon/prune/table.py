"""A fixed-width table of a pruning report: params and MACs per layer, before and after.

    >>> rep = prune_(model, ChannelPruning(ratio=0.5), example_inputs=x)
    >>> text = prune_table(rep)              # the library never prints; the CLI does
"""

from __future__ import annotations

from ..report import CompressionReport


def _ratio(after: float, before: float) -> str:
    return f"{after / before:>7.1%}" if before else f"{'-':>7}"


def prune_table(report: CompressionReport) -> str:
    """One line per changed layer (shape, params and MACs before -> after), then totals and notes."""
    head = f"{'layer':<32} {'shape':<18} {'params':>17} {'kept':>7} {'MACs':>23} {'kept':>7} {'rel.err':>9}"
    lines = [head, "-" * len(head)]
    for r in report.rows:
        pb, mb, ma = getattr(r, "params_before", r.params), getattr(r, "macs_before", 0), getattr(r, "macs", 0)
        shape = "x".join(str(d) for d in r.shape)
        lines.append(f"{r.name[:32]:<32} {shape[:18]:<18} {f'{pb}->{r.params}':>17} {_ratio(r.params, pb)} "
                     f"{f'{mb}->{ma}':>23} {_ratio(ma, mb)} {r.rel_loss:>9.2e}")
    lines.append("-" * len(head))
    for key in ("params", "macs"):
        m = report.metrics.get(key)
        if m:
            lines.append(f"{key}: {m['before']:,.0f} -> {m['after']:,.0f} ({m['after'] / m['before']:.1%} kept, "
                         f"{m['before'] / max(m['after'], 1):.2f}x smaller)")
    for name, m in report.metrics.items():
        if name not in ("params", "macs") and "before" in m and "after" in m:
            b, a = m["before"], m["after"]
            lines.append(f"{name}: before {b:.4f}  after {a:.4f}  delta {a - b:+.4f}")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)
