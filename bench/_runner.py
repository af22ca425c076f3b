"""The runner shared by bench/toolbox.py and its parts' own entry points (bench/distill_qat.py,
bench/lowrank_share.py): flags, the bound checker, tables, timing, --json.

The floor below all three (the parts never import toolbox, toolbox imports the parts), so the
import graph is one-way::

    >>> from _runner import run
    >>> sys.exit(run({"kd": kd_vs_finetune, "qat": qat_vs_ptq}, doc=__doc__))
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Bench:
    """What every part gets: the mode, the bound checker, the table printer and a dict for --json."""

    quick: bool
    workers: int = 1
    out: dict = field(default_factory=dict)
    fails: list[str] = field(default_factory=list)
    passed: int = 0

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if ok:
            self.passed += 1
        else:
            self.fails.append(what)

    @staticmethod
    def table(head: Sequence[str], rows: Sequence[Sequence], widths: Sequence[int]) -> None:
        """First column left-aligned, the others right-aligned."""
        for r in [head, *rows]:
            cells = [f"{v!s:<{w}}" if i == 0 else f"{v!s:>{w}}" for i, (v, w) in enumerate(zip(r, widths, strict=True))]
            print("  " + " ".join(cells))


def run(available: dict[str, Callable[[Bench], None]], argv: list[str] | None = None,
        parts: Sequence[str] | None = None, doc: str = "", prog: str = "bench/toolbox.py") -> int:
    """Run the named parts of `available` (default: all) and return 1 when a bound failed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run; exit 1 when a stated bound fails")
    ap.add_argument("--only", default=",".join(parts or available), help=f"comma-separated parts of {list(available)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--workers", type=int, default=1, help="processes for the kd part's independent runs (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the tables as JSON")
    args = ap.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in available]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {list(available)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    print(f"{prog}{' --quick' if args.quick else ''}: torch {torch.__version__}, {args.threads} "
          f"thread(s), load average {load:.1f} on {os.cpu_count()} cores (wall seconds inflate with load)")
    b = Bench(args.quick, max(1, args.workers))
    times = []
    for name in chosen:
        w0, c0 = time.perf_counter(), time.process_time()
        print(f"\n== {name}")
        available[name](b)
        times.append((name, time.perf_counter() - w0, time.process_time() - c0))
    print("\n== time (CPU: this process, all threads)")
    b.table(["part", "wall s", "CPU s"], [[n, f"{w:.0f}", f"{c:.0f}"] for n, w, c in times]
            + [["total", f"{sum(t[1] for t in times):.0f}", f"{time.process_time():.0f}"]], [10, 7, 7])
    print(f"\n{b.passed} bound(s) ok, {len(b.fails)} failed" + "".join(f"\n  FAILED: {f}" for f in b.fails))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"quick": args.quick, "parts": b.out, "times": times, "failed": b.fails}, f, indent=1,
                      default=str)
    return 1 if b.fails else 0
