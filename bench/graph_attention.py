"""Window/relative-position attention in torchvision: heads prune with verification passing.

    python bench/graph_attention.py            # swin_t, swin_v2_t, swin_s, swin3d_t, maxvit_t, mvit_v2_s
    python bench/graph_attention.py --quick    # swin_t, swin_v2_t

Every model: weights=None, eval, the input of bench/graph_coverage.py (1-2 x 3 x 64 x 64; 224 for MaxViT;
16 frames of 224 for MViT), ``prune_(model, ChannelPruning(ratio=0.5, importance="l2"))`` with the
classifier ignored, torch.set_num_threads(1). Columns: params and MACs before/after, groups that failed
verification (left unpruned, listed in the report notes), process CPU seconds of prune_ (build + score +
verified prune), and whether a train-mode forward still runs. Exit 1 if a group failed or train mode broke.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    import torch

    sys.path.insert(0, HERE)
    import graph_coverage as gc
    from brainsurgeon.prune import ChannelPruning, prune_

    torch.set_num_threads(1)
    models = args.models or (["swin_t", "swin_v2_t"] if args.quick else
                             ["swin_t", "swin_v2_t", "swin_s", "swin3d_t", "maxvit_t", "mvit_v2_s"])
    print(f"{'model':<11} {'params before':>14} {'after':>12} {'MACs before':>14} {'after':>14} {'failed':>6} "
          f"{'cpu s':>7}  train")
    bad = 0
    for name in models:
        torch.manual_seed(0)
        model, x = gc.build(name), gc.inputs(name)
        heads = {id(m) for m in gc.head_modules(model, name)}
        ignore = tuple(re.escape(n) for n, m in model.named_modules() if id(m) in heads)
        t0 = time.process_time()
        rep = prune_(model, ChannelPruning(ratio=0.5, importance="l2", ignore=ignore), x)
        cpu = time.process_time() - t0
        failed = sum("failed verification" in n for n in rep.notes)
        try:
            with torch.no_grad():
                model.train()
                model(*x)
            train = "ok"
        except Exception as e:  # noqa: BLE001
            train = f"FAILED {type(e).__name__}"
        finally:
            model.eval()
        p, mac = rep.metrics["params"], rep.metrics["macs"]
        print(f"{name:<11} {p['before']:>14,.0f} {p['after']:>12,.0f} {mac['before']:>14,.0f} {mac['after']:>14,.0f} "
              f"{failed:>6} {cpu:>7.2f}  {train}", flush=True)
        bad += failed > 0 or train != "ok"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
