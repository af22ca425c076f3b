"""The classic toolbox, measured (issue 5): Deep Compression, KD vs plain fine-tuning, activation-aware
SVD, Tucker-2 on real 3x3 convs, QAT vs PTQ. Prints every table of the issue's Proof section.

    python bench/toolbox.py --workers 2         # full tables: kd 79 CPU-min (44 min wall), the rest 17 CPU-min
    python bench/toolbox.py --quick             # reduced run (78 CPU s, 1 thread; kd 26); exit 1 if a bound fails
    python bench/toolbox.py --only kd,qat --json out.json

Parts (experiments live in bench/lowrank_share.py and bench/distill_qat.py; this file runs them,
checks their bounds and reports time):

  deepcomp  MNIST CNN: prune -> retrain -> k-means share -> centroid fine-tuning -> Huffman, bytes on
            disk of real files.                     Bound: Huffman file >= 20x smaller, <= 1 pt drop.
  kd        Fashion-MNIST CNN with half its MACs removed by brainsurgeon.prune.prune_, fine-tuned with
            Hinton KD (teacher: its dense self) vs plain cross-entropy, paired by seed, 5 seeds, all 55k
            labels, 16 epochs with function-matching augmentation (shift + mirror, the same view for
            teacher and student), for two dense models: the zoo's (30 augmented epochs) and an 8-epoch
            plain-trained one. Bounds, per dense model: MACs <= 0.55x; KD test mean within 0.5 pt of
            dense; KD mean > plain mean and KD ahead on most seeds (quick: the zoo model, 6k labels,
            6 epochs, one seed, 2k test images: KD within 1.5 pt of dense, KD > plain).
  minilm    all-MiniLM-L6-v2 FFN: activation-aware vs plain SVD at equal parameters (cosine to dense
            embeddings, SimLex-999 / WordSim-353).     Bound: ASVD cosine > SVD cosine.
  convs     Tucker-2 on real 3x3 convs: ResNet-20 (Fashion-MNIST) HOSVD vs HOOI (vs channel SVD/ASVD)
            with accuracy and agreement vs dense before/after a short KD fine-tune; MobileNetV2's stem
            (its only full 3x3 conv) and its large 1x1 convs (plain vs activation-aware SVD) with
            agreement on photo crops. Bounds: HOOI kernel error <= HOSVD's; ASVD agreement >= SVD's.
  qat       MNIST CNN at 4/3/2 bits: RTN, GPTQ, and QAT started from GPTQ, converted back on the grid
            and packed (quick: 4 bits). Bounds: QAT >= best PTQ; starts at GPTQ; on grid; packed within
            0.1 pt of fake-quant.

No ImageNet ResNet weights ship offline (only MobileNetV2's, see ASSETS.md), so the ResNet rows use
the CIFAR-style ResNet-20 trained on Fashion-MNIST (brainsurgeon.models, cached after first use).
--quick: cached models, subsets of the data, fewer steps, one budget per table; it checks every bound
on real data. Timing: CPU seconds of this process (--threads 1 by default) and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


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


def _parts() -> dict[str, Callable[[Bench], None]]:
    import distill_qat
    import lowrank_share

    return {"deepcomp": lowrank_share.deep_compression, "kd": distill_qat.kd_vs_finetune,
            "minilm": lowrank_share.minilm_svd, "convs": lowrank_share.conv_factorization,
            "qat": distill_qat.qat_vs_ptq}


def main(argv: list[str] | None = None, parts: Sequence[str] | None = None) -> int:
    """Run the named parts (default: all) and return 1 when a bound failed."""
    available = _parts()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print(f"bench/toolbox.py{' --quick' if args.quick else ''}: torch {torch.__version__}, {args.threads} "
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


if __name__ == "__main__":
    sys.exit(main())
