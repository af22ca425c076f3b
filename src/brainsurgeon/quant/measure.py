"""Measured latency (torch.utils.benchmark, fixed threads, warm-up, median and IQR) and theoretical MACs.

    >>> t = time_model(model, torch.randn(32, 3, 224, 224), threads=1)
    >>> t.median_ms, t.iqr_ms
    >>> rows = compare_latency({"dense": dense, "packed": packed}, {1: x1, 32: x32})
    >>> count_macs(model, x1)          # multiply-accumulates of the weight layers for this input

Timings on a shared or loaded machine are noisy: the median of many blocked runs and the IQR are
reported, never the minimum; compare models measured in the same process, interleaved. On an
oversubscribed machine (load average >> cores) wall time mostly measures the scheduler:
``clock="cpu"`` times the process's CPU time instead (single-threaded only), which leaves out the
time the process waited for a core but keeps its own compute and memory stalls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._modes import eval_mode
from ..errors import ConfigError

CLOCKS = ("wall", "cpu")


@dataclass
class Timing:
    """One latency measurement: median and interquartile range over blocked runs (seconds)."""

    median_s: float
    iqr_s: float
    runs: int
    threads: int
    times: list[float] = field(default_factory=list, repr=False)  # per-run seconds (blocked averages)
    clock: str = "wall"

    @staticmethod
    def of(times: list[float], threads: int, clock: str = "wall") -> Timing:
        """Median and IQR of per-run times."""
        t = torch.tensor(times, dtype=torch.float64)
        q25, q50, q75 = (float(v) for v in torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
        return Timing(q50, q75 - q25, len(times), threads, list(times), clock)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median_s

    @property
    def iqr_ms(self) -> float:
        return 1e3 * self.iqr_s


def time_call(fn: Callable[[], Any], *, threads: int = 1, warmup: int = 3, min_run_time: float = 0.5,
              clock: str = "wall") -> Timing:
    """Median and IQR of `fn()` with `threads` intra-op threads, after `warmup` untimed calls.

    clock: ``wall`` (perf_counter) or ``cpu`` (the process's CPU time; needs threads=1).

    >>> time_call(lambda: a @ b, threads=1).median_ms
    """
    import time

    import torch.utils.benchmark as tb

    if clock not in CLOCKS:
        raise ConfigError(f"time_call: clock={clock!r}; allowed: {list(CLOCKS)}")
    if clock == "cpu" and threads != 1:
        raise ConfigError(f"time_call: clock='cpu' sums the CPU time of all threads, so it is a latency only "
                          f"with threads=1 (got threads={threads}); use clock='wall' for {threads} threads")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for _ in range(warmup):
            fn()
        m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads,
                     timer=timer).blocked_autorange(min_run_time=min_run_time)
    finally:
        torch.set_num_threads(prev)
    return Timing.of([float(v) for v in m.times], threads, clock)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def time_model(model: nn.Module, inputs: Any, *, threads: int = 1, warmup: int = 3,
               min_run_time: float = 0.5, clock: str = "wall") -> Timing:
    """Latency of ``model(inputs)`` in eval mode under ``torch.inference_mode`` (mode restored after).

    inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors.

    >>> time_model(model, torch.randn(1, 3, 224, 224)).median_ms
    """
    with eval_mode(model), torch.inference_mode():
        return time_call(lambda: _call(model, inputs), threads=threads, warmup=warmup,
                         min_run_time=min_run_time, clock=clock)


def _module_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int | None:
    """MACs of one weight layer for one call, or None for modules without weights."""
    if isinstance(m, nn.modules.conv._ConvNd) or type(m).__name__ == "PackedConv2d":
        k = 1
        for s in m.kernel_size:
            k *= s
        return out.numel() * (m.in_channels // m.groups) * k
    if hasattr(m, "in_features") and hasattr(m, "out_features") and isinstance(out, torch.Tensor):
        tokens = inp.numel() // m.in_features
        density = getattr(m, "density", 1.0)  # SparseLinear: only the stored weights
        return round(tokens * m.in_features * m.out_features * density)
    return None


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of the weight layers (Linear, Conv, packed and sparse variants) for `inputs`.

    Sparse layers count only their stored weights (the ideal a sparse kernel could reach);
    attention score/value products and elementwise ops are not counted.

    >>> count_macs(nn.Linear(10, 4), torch.randn(3, 10))
    120
    """
    total = [0]

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            macs = _module_macs(m, args[0], out)
            total[0] += macs or 0

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with eval_mode(model), torch.inference_mode():
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


@dataclass
class SpeedRow:
    """Latency of one model variant at one batch size, against the dense reference."""

    variant: str
    batch: int
    timing: Timing
    speedup: float  # dense median / this median
    mac_ratio: float  # dense MACs / this variant's MACs (the theoretical speed-up)

    @property
    def efficiency(self) -> float:
        """Measured speed-up as a fraction of the theoretical MAC ratio."""
        return self.speedup / self.mac_ratio


def compare_latency(models: Mapping[str, nn.Module], inputs: Mapping[int, Any], *, threads: int = 1,
                    min_run_time: float = 0.5, rounds: int = 3, warmup: int = 3,
                    reference: str | None = None, clock: str = "wall") -> list[SpeedRow]:
    """Time every model at every batch size; speed-ups and MAC ratios relative to `reference` (first).

    The models are timed in `rounds` interleaved rounds (``min_run_time / rounds`` each) and the
    runs pooled, so load that comes and goes on a shared machine hits every variant alike.

    >>> rows = compare_latency({"dense": dense, "pruned": pruned}, {1: x1, 32: x32})
    >>> [(r.variant, r.batch, round(r.speedup, 2), round(r.mac_ratio, 2)) for r in rows]
    """
    ref = reference or next(iter(models))
    rows = []
    for batch, x in inputs.items():
        runs: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(rounds):
            for n, m in models.items():
                runs[n] += time_model(m, x, threads=threads, warmup=warmup, min_run_time=min_run_time / rounds,
                                      clock=clock).times
        t = {n: Timing.of(v, threads, clock) for n, v in runs.items()}
        macs = {n: count_macs(m, x) for n, m in models.items()}
        for n in models:
            rows.append(SpeedRow(n, batch, t[n], t[ref].median_s / t[n].median_s,
                                 macs[ref] / max(macs[n], 1)))
    return rows


def format_speed_table(rows: list[SpeedRow]) -> str:
    """A plain-text table of :func:`compare_latency` rows."""
    clock = rows[0].timing.clock if rows else "wall"
    ms = "median ms" if clock == "wall" else "cpu ms"
    head = f"{'variant':<24} {'batch':>5} {ms:>10} {'IQR ms':>8} {'speed-up':>9} {'MAC ratio':>9} {'eff.':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.variant:<24} {r.batch:>5} {r.timing.median_ms:>10.2f} {r.timing.iqr_ms:>8.2f} "
                     f"{r.speedup:>8.2f}x {r.mac_ratio:>8.2f}x {r.efficiency:>5.2f}")
    return "\n".join(lines)
