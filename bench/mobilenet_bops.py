"""Mixed 2:4 + 4/8-bit weights under a BOP budget on MobileNetV2 (real ImageNet weights): DP vs uniform.

    python bench/mobilenet_bops.py            # 128 calibration crops, 256 evaluation crops, 4 budgets
    python bench/mobilenet_bops.py --quick    # 32 / 64 crops, OBS-loss scores, budgets 1/8 and 1/12

Per layer the search space holds dense, 2:4, 8-bit, 4-bit, 2:4 + 8-bit and 2:4 + 4-bit (SparseGPT
2:4, GPTQ weights on asymmetric per-channel grids as in OBC's CNN experiments; a layer whose input
channels are not a multiple of 4 -- the first conv and the depthwise convs -- gets only the bit
widths). Each entry's score is the measured model-output
distortion with only that layer compressed, on 8 calibration crops (OBC's database; a forward
of MobileNetV2 per entry, 264 entries; --quick: the relative OBS layer loss
tr(dW H dW^T) / tr(W H W^T), which needs no forward per entry). BOPs = MACs x weight bits x
activation bits with fp32 activations (dense = 32 x 32 per MAC); the budget is a fraction of the
dense BOPs of all conv/linear layers. Plans are stitched from the database weights (OBC's
stitching) and, in the full run, also applied with ``apply_plan_`` (the verbs re-solve each
layer sequentially on the compressed model's own inputs).

No ImageNet images ship here, so damage is measured against the dense model on random crops of
real photos (``bench/_vision.py``): top-1 agreement and KL(dense || compressed). Calibration crops
come from other photos and another seed than the evaluation crops. The uniform baseline is one
variant name for every layer; where it cannot meet a budget (the first conv and the depthwise
convs cannot take 2:4) it is reported as infeasible. Exit 1 if DP's agreement is below uniform's
at a budget both meet, or a DP plan is over its budget.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from _vision import crops, damage, logits_of, mobilenet_v2, photos
from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import BudgetInfeasibleError
from brainsurgeon.search import (
    Budget,
    SearchSpace,
    apply_plan_,
    build_database,
    dp_plan,
    stitch_,
    uniform_plan,
)


def space(quick: bool) -> SearchSpace:
    return SearchSpace(prune_method="SparseGPT", quant_method="GPTQ", levels=0, nm=("2:4",), block_sparsities=(),
                       bits=(8, 4), nm_bits=(8, 4), quant_sym=False, model_loss=not quick, model_loss_batches=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", default="out/mobilenet-bops-db")
    ap.add_argument("--no-apply", action="store_true", help="full run without the apply_plan_ re-solve of DP plans")
    args = ap.parse_args()
    torch.set_num_threads(1 if args.quick else 2)
    t_start = time.perf_counter()
    net, imgs = mobilenet_v2(), photos()
    n_cal, n_eval = (32, 64) if args.quick else (128, 256)
    x_cal = crops(imgs[0::2], n_cal, seed=1)  # calibration and evaluation photos differ
    x_eval = crops(imgs[1::2], n_eval, seed=2)
    calib = [x_cal[i:i + 8] for i in range(0, n_cal, 8)]  # Hessians: all; each entry's distortion: the first 8
    ref = logits_of(net, x_eval)
    t0 = time.perf_counter()
    table = build_database(net, space(args.quick), calib, args.db + ("-quick" if args.quick else ""))
    n = sum(len(v) for v in table.entries.values())
    print(f"database: {n} entries over {len(table.layers)} layers ({table.computed} computed now) "
          f"in {time.perf_counter() - t0:.0f}s; {n_cal} calibration crops, {n_eval} evaluation crops")
    fracs = (1 / 8, 1 / 12) if args.quick else (1 / 4, 1 / 8, 1 / 12, 1 / 16)
    rows, failures = [], []
    for f in fracs:
        budget = Budget("bops", f)
        for name, solve in (("uniform", uniform_plan), ("DP", dp_plan)):
            try:
                plan = solve(table, budget)
            except BudgetInfeasibleError as e:
                rows.append((budget, name, None, "infeasible", str(e).split(";")[0][:70]))
                continue
            m = stitch_(copy.deepcopy(net), plan, table)
            agree, kl = damage(ref, logits_of(m, x_eval))
            applied = ""
            if not (args.quick or args.no_apply) and name == "DP":
                m = copy.deepcopy(net)
                apply_plan_(m, plan, calib, CalibOptions(bn_reestimate=False))
                a2, k2 = damage(ref, logits_of(m.eval(), x_eval))
                applied = f"{100 * a2:.1f}% / {k2:.4f}"
            counts = {v: plan.variants.count(v) for v in dict.fromkeys(plan.variants)}
            rows.append((budget, name, (plan.info["cost"], agree, kl), applied,
                         " ".join(f"{v}x{c}" for v, c in counts.items())))
            if name == "DP" and plan.info["cost"] > f + 1e-9:
                failures.append(f"{budget}: DP cost {plan.info['cost']} over budget")
        got = {r[1]: r[2] for r in rows if r[0] == budget and r[2] is not None}
        if "DP" in got and "uniform" in got and got["DP"][1] < got["uniform"][1]:
            failures.append(f"{budget}: DP agreement {got['DP'][1]:.4f} < uniform {got['uniform'][1]:.4f}")
    print(f"\nMobileNetV2 (ImageNet weights), damage vs dense on {n_eval} real-photo crops; plans stitched "
          f"from the database{'' if args.quick or args.no_apply else ' (and DP applied with apply_plan_)'}")
    print(f"{'budget':<14}{'reduction':>10}{'solver':>9}{'cost':>9}{'agree':>8}{'KL':>9}  {'applied':<18} variants")
    for budget, name, res, applied, variants in rows:
        red = f"{1 / budget.fraction:.0f}x"
        if res is None:
            print(f"{str(budget):<14}{red:>10}{name:>9}  {applied}: {variants}")
            continue
        cost, agree, kl = res
        print(f"{str(budget):<14}{red:>10}{name:>9}{cost:>9.4f}{100 * agree:>7.1f}%{kl:>9.4f}  {applied:<18} "
              f"{variants}")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
