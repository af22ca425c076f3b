"""Budget search on the digits CNN: DP vs uniform vs global magnitude vs AMC at 2x/4x/8x FLOPs and BOPs.

    python bench/search_budgets.py            # full space, plans applied with the verbs (~3 min, 1 thread)
    python bench/search_budgets.py --quick    # reduced space, plans stitched from the database (< 1 min);
                                              # exit 1 if DP loses to uniform at any budget

For every budget (fraction of the dense model's FLOPs or BOPs over its conv/linear layers;
BOPs = MACs x weight bits x activation bits, activations stay fp32) each solver returns a plan;
the plan is applied (full: `apply_plan_`, i.e. the verbs re-solve each layer sequentially; quick:
the database weights are stitched in) and test accuracy is measured before and after BatchNorm
re-estimation on the calibration data. AMC's reward uses 512 held-out *training* images, never
the test set. The database is built once per space (resumable) under --db. A Pareto plot
(accuracy vs cost) is written to --out.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from brainsurgeon.calib import reestimate_batchnorm_
from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import BudgetInfeasibleError
from brainsurgeon.models import calibration_loader, evaluate, pretrained
from brainsurgeon.search import (
    AMC,
    AMCSearch,
    Budget,
    SearchSpace,
    StitchedModel,
    apply_plan_,
    build_database,
    dp_plan,
    global_magnitude_plan,
    load_space,
    stitch_,
    uniform_plan,
)

BUDGETS = [Budget(m, 1 / f) for m in ("flops", "bops") for f in (2, 4, 8)]
QUICK_BUDGETS = [Budget("flops", 1 / 4), Budget("flops", 1 / 8), Budget("bops", 1 / 8)]


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")


def spaces(quick: bool) -> SearchSpace:
    return load_space(os.path.join(RECIPES, "search-quick.yaml" if quick else "search-digits.yaml"))


def solvers(quick: bool, model, table, stitched):
    amc = AMC(episodes=40 if quick else 200, warmup=10 if quick else 50)
    return {
        "uniform": lambda b: uniform_plan(table, b),
        "global-mag": lambda b: global_magnitude_plan(model, table, b),
        "DP": lambda b: dp_plan(table, b),
        "AMC-rc": lambda b: AMCSearch(amc, table, b, stitched.error).run(),
        "AMC-ag": lambda b: AMCSearch(AMC(**{**_fields(amc), "mode": "accuracy"}), table, b, stitched.error).run(),
    }


def _fields(cfg):
    d = cfg.to_dict()
    d.pop("type")
    d.pop("version")
    return d


def measure(model, plan, table, calib, test_ds, stitch: bool) -> tuple[float, float, float]:
    """(accuracy without BN re-estimation, with it, seconds to apply)."""
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    if stitch and plan.variants and not plan.variants[0].startswith("mag@"):
        stitch_(m, plan, table)
    else:
        apply_plan_(m, plan, calib, CalibOptions(bn_reestimate=False))
    sec = time.perf_counter() - t0
    plain = evaluate(m, test_ds)
    reestimate_batchnorm_(m, calib)
    return plain, evaluate(m, test_ds), sec


def pareto_plot(rows, dense_acc: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("flops", "bops"), strict=True):
        for solver in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted((r["cost"], r["acc_bn"]) for r in rows if r["metric"] == metric and r["solver"] == solver)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=solver)
        ax.axhline(100 * dense_acc, color="gray", ls="--", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{metric.upper()} (fraction of dense, log2)")
        ax.set_title(f"digits CNN: accuracy vs {metric.upper()} (BN re-estimated)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", default="out/search-db")
    ap.add_argument("--out", default="out/search_budgets.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, train_ds, test_ds = pretrained("digits-cnn")
    calib = list(calibration_loader(train_ds, n=512, batch_size=128, seed=0))
    held = calibration_loader(train_ds, n=512, batch_size=512, seed=1).dataset  # AMC reward: train images
    dense_acc = evaluate(model, test_ds)
    space = spaces(args.quick)
    t0 = time.perf_counter()
    table = build_database(model, space, calib, args.db)
    n_entries = sum(len(v) for v in table.entries.values())
    print(f"database: {n_entries} entries over {len(table.layers)} layers ({table.computed} computed now) "
          f"in {time.perf_counter() - t0:.1f}s at {args.db}")
    stitched = StitchedModel(model, table, calib, eval_fn=lambda m: evaluate(m, held))
    rows = []
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    for budget in budgets:
        for name, solve in solvers(args.quick, model, table, stitched).items():
            t0 = time.perf_counter()
            try:
                plan = solve(budget)
            except BudgetInfeasibleError as e:
                print(f"{budget} {name}: infeasible ({str(e)[:80]})")
                continue
            t_solve = time.perf_counter() - t0
            plain, bn, t_apply = measure(model, plan, table, calib, test_ds, stitch=args.quick)
            rows.append({"metric": budget.metric, "budget": budget.fraction, "solver": name, "cost": plan.info["cost"],
                         "acc": plain, "acc_bn": bn, "t_solve": t_solve, "t_apply": t_apply,
                         "variants": ",".join(plan.variants)})
    how = "stitched from the database" if args.quick else "applied with apply_plan_ (sequential re-solve)"
    print(f"\ndigits CNN, dense test accuracy {100 * dense_acc:.2f}% (360 test images); plans {how}")
    print(f"{'budget':<12}{'solver':<12}{'cost':>8}{'acc':>8}{'acc+BN':>8}{'solve s':>9}{'apply s':>9}  variants")
    for r in rows:
        print(f"{r['metric']}={r['budget']:<6.4g}{r['solver']:<12}{r['cost']:>8.4f}{100 * r['acc']:>8.2f}"
              f"{100 * r['acc_bn']:>8.2f}{r['t_solve']:>9.2f}{r['t_apply']:>9.2f}  {r['variants']}")
    pareto_plot(rows, dense_acc, args.out)
    print(f"\nPareto plot: {args.out}; total {time.perf_counter() - t_start:.1f}s")
    failures = []
    for b in budgets:
        get = {r["solver"]: r for r in rows if r["metric"] == b.metric and r["budget"] == b.fraction}
        if "DP" not in get:
            failures.append(f"{b}: DP found no plan")
        elif "uniform" in get and get["DP"]["acc_bn"] < get["uniform"]["acc_bn"]:
            failures.append(f"{b}: DP {get['DP']['acc_bn']:.4f} < uniform {get['uniform']['acc_bn']:.4f}")
        if "DP" in get and get["DP"]["cost"] > b.fraction + 1e-9:
            failures.append(f"{b}: DP cost {get['DP']['cost']} over budget")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
