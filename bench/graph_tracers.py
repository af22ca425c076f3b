"""Build time of DependencyGraph with each tracer: the ATen dispatch recorder vs torch.export.

    python bench/graph_tracers.py            # resnet50, densenet201, swin_t
    python bench/graph_tracers.py --quick    # resnet18, swin_t

Every model: torchvision, weights=None, eval, input 1x3x64x64, torch.set_num_threads(1). Seconds are
process CPU time (time.process_time) of ``DependencyGraph(model, x, tracer=...)`` (trace + rules), then of
``groups()``; "same" says whether both tracers found the same groups (root, dim, rows, slices).
Exit 1 if the tracers disagree on a model.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    import torch
    import torchvision

    from brainsurgeon.graph import DependencyGraph

    torch.set_num_threads(1)
    models = args.models or (["resnet18", "swin_t"] if args.quick else ["resnet50", "densenet201", "swin_t"])
    print(f"{'model':<14} {'tracer':<9} {'ops':>6} {'build s':>8} {'groups s':>9} {'groups':>7}  same")
    bad = 0
    for name in models:
        model = torchvision.models.get_model(name, weights=None).eval()
        x = (torch.randn(1, 3, 64, 64),)
        sigs = {}
        for tracer in ("dispatch", "export"):
            t0 = time.process_time()
            g = DependencyGraph(model, x, tracer=tracer)
            t1 = time.process_time()
            groups = g.groups()
            t2 = time.process_time()
            sigs[tracer] = sorted((grp.root.name, grp.root.dim, grp.n,
                                   tuple(sorted((s.name, s.dim) for s in grp.slices))) for grp in groups)
            same = "" if tracer == "dispatch" else ("yes" if sigs["export"] == sigs["dispatch"] else "NO")
            print(f"{name:<14} {tracer:<9} {g.n_ops:>6} {t1 - t0:>8.3f} {t2 - t1:>9.3f} {len(groups):>7}  {same}",
                  flush=True)
        bad += sigs["export"] != sigs["dispatch"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
