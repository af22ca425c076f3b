"""Mixed 2:4 + 4/8-bit weights under a BOP budget on MobileNetV2 (real ImageNet weights): DP and SPDY vs uniform.

    python bench/mobilenet_bops.py            # 128 Hessian crops, 64 scoring crops, 256 evaluation crops, 4 budgets
    python bench/mobilenet_bops.py --quick    # 32 / 32 / 64 crops, per-layer scaled scores, budgets 1/8 and 1/12

Per layer the search space holds dense, 2:4, 8-bit, 4-bit, 2:4 + 8-bit and 2:4 + 4-bit (SparseGPT
2:4, GPTQ weights on asymmetric per-channel grids as in OBC's CNN experiments; a layer whose input
channels are not a multiple of 4 -- the first conv and the depthwise convs -- gets only the bit
widths). BOPs = MACs x weight bits x activation bits with fp32 activations (dense = 32 x 32 per
MAC); the budget is a fraction of the dense BOPs of all conv/linear layers.

Scores (``score_table``): each entry's output KL(dense || compressed) with only that layer
compressed, on scoring crops -- other crops (another seed) of the calibration photos, never the
evaluation photos. Full run: every entry measured on 64 crops; --quick: one entry per layer on
32 crops, the layer's other OBS losses scaled by that ratio. Solvers: uniform (one variant name
for every layer; where it cannot meet a budget -- the first conv and the depthwise convs cannot
take 2:4 -- it is reported as infeasible), DP (the knapsack over the scores) and SPDY (DP over
scores reweighted per layer, the weights found by a local search on the stitched model's KL on
16 (quick) / 32 scoring crops; it starts at the DP plan). Plans are stitched from the database weights
(OBC's stitching); "corr" then matches each compressed layer's output mean/std to the dense
model's on 32 scoring crops (OBC's statistics correction; full run only), and the full run
also applies SPDY's plan with ``apply_plan_`` (the verbs re-solve each layer sequentially on
the compressed model's own inputs; --no-apply skips it).

No ImageNet images ship here, so damage is measured against the dense model on random crops of
real photos (``bench/_vision.py``): top-1 agreement and KL(dense || compressed) on evaluation
crops of other photos, used only for this table. Exit 1 if DP's or SPDY's agreement is below
uniform's at a budget both meet (stitched plans), or a plan is over its budget.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from _vision import crops, damage, logits_of, mobilenet_v2, photos
from brainsurgeon.calib.recalib import correct_mean_std_
from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import BudgetInfeasibleError
from brainsurgeon.search import (
    SPDY,
    Budget,
    SearchSpace,
    StitchedModel,
    apply_plan_,
    build_database,
    dp_plan,
    score_table,
    spdy_plan,
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
    ap.add_argument("--evals", type=int, default=0, help="SPDY evaluations per budget (default 100; quick 30)")
    ap.add_argument("--no-apply", action="store_true", help="full run without the apply_plan_ re-solve")
    args = ap.parse_args()
    torch.set_num_threads(1 if args.quick else 2)
    t_start = time.perf_counter()
    net, imgs = mobilenet_v2(), photos()
    n_cal, n_score, n_eval = (32, 32, 64) if args.quick else (128, 64, 256)
    x_cal = crops(imgs[0::2], n_cal, seed=1)  # Hessians
    x_score = crops(imgs[0::2], n_score, seed=3)  # scores, SPDY, statistics correction: other crops, same photos
    x_eval = crops(imgs[1::2], n_eval, seed=2)  # evaluation photos: only for the table
    calib = [x_cal[i:i + 8] for i in range(0, n_cal, 8)]
    scoring = [x_score[i:i + 16] for i in range(0, n_score, 16)]
    ref = logits_of(net, x_eval)
    t0 = time.perf_counter()
    table = build_database(net, space(args.quick), calib, args.db + ("-quick" if args.quick else ""))
    n = sum(len(v) for v in table.entries.values())
    print(f"database: {n} entries over {len(table.layers)} layers ({table.computed} computed now) "
          f"in {time.perf_counter() - t0:.0f}s; {n_cal} Hessian crops, {n_score} scoring crops, {n_eval} evaluation "
          f"crops")
    t0 = time.perf_counter()
    per = "layer" if args.quick else "entry"
    table = score_table(net, table, scoring, "kl", per=per)
    print(f"scores: output KL per {per} on {n_score} crops in {time.perf_counter() - t0:.0f}s")
    stitched = StitchedModel(net, table, scoring, batches=1 if args.quick else 2, metric="kl")  # 16 / 32 crops
    cfg = SPDY(evals=args.evals or (30 if args.quick else 100), patience=10 if args.quick else 20)
    solvers = {"uniform": lambda b: uniform_plan(table, b), "DP": lambda b: dp_plan(table, b),
               "SPDY": lambda b: spdy_plan(table, b, stitched.error, cfg)}
    fracs = (1 / 8, 1 / 12) if args.quick else (1 / 4, 1 / 8, 1 / 12, 1 / 16)
    rows, failures = [], []
    for f in fracs:
        budget = Budget("bops", f)
        got = {}
        for name, solve in solvers.items():
            t0 = time.perf_counter()
            try:
                plan = solve(budget)
            except BudgetInfeasibleError as e:
                rows.append((budget, name, None, "", str(e).split(";")[0][:70]))
                continue
            m = stitch_(copy.deepcopy(net), plan, table)
            agree, kl = damage(ref, logits_of(m, x_eval))
            got[name] = agree
            extra = ""
            if not args.quick:
                correct_mean_std_(m, net, table.layers, scoring[:2])
                a2, k2 = damage(ref, logits_of(m, x_eval))
                extra = f"corr {100 * a2:.1f}% / {k2:.4f}"
            if not (args.quick or args.no_apply) and name == "SPDY":
                m = copy.deepcopy(net)
                apply_plan_(m, plan, calib, CalibOptions(bn_reestimate=False))
                a3, k3 = damage(ref, logits_of(m.eval(), x_eval))
                extra += f"; applied {100 * a3:.1f}% / {k3:.4f}"
            if name == "SPDY":
                extra += f"; calib KL {plan.info['score']:.4f} (DP {plan.info['dp_loss']:.4f}, {plan.info['evals']} ev)"
            counts = {v: plan.variants.count(v) for v in dict.fromkeys(plan.variants)}
            rows.append((budget, name, (plan.info["cost"], agree, kl, time.perf_counter() - t0), extra,
                         " ".join(f"{v}x{c}" for v, c in counts.items())))
            if plan.info["cost"] > f + 1e-9:
                failures.append(f"{budget}: {name} cost {plan.info['cost']} over budget")
        for name in ("DP", "SPDY"):
            if name in got and "uniform" in got and got[name] < got["uniform"]:
                failures.append(f"{budget}: {name} agreement {got[name]:.4f} < uniform {got['uniform']:.4f}")
    print(f"\nMobileNetV2 (ImageNet weights), damage vs dense on {n_eval} real-photo crops; plans stitched "
          f"from the database (agreement / KL)")
    print(f"{'budget':<14}{'reduction':>10}{'solver':>9}{'cost':>9}{'agree':>8}{'KL':>9}{'sec':>6}  variants")
    for budget, name, res, extra, variants in rows:
        red = f"{1 / budget.fraction:.0f}x"
        if res is None:
            print(f"{str(budget):<14}{red:>10}{name:>9}  infeasible: {variants}")
            continue
        cost, agree, kl, sec = res
        print(f"{str(budget):<14}{red:>10}{name:>9}{cost:>9.4f}{100 * agree:>7.1f}%{kl:>9.4f}{sec:>6.0f}  {variants}")
        if extra:
            print(f"{'':>33}{extra}")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
