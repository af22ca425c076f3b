"""Budget search on the digits (or MNIST) CNN: DP vs uniform vs global magnitude vs AMC at 2x/4x/8x FLOPs and BOPs.

    python bench/search_budgets.py            # full: channels section + full space, plans applied with the verbs
    python bench/search_budgets.py --section channels   # structured channel ratios only (DP vs uniform)
    python bench/search_budgets.py --model mnist-cnn    # MNIST CNN, SparseGPT/GPTQ space (10k test images)
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
    search,
    stitch_,
    uniform_plan,
)

BUDGETS = [Budget(m, 1 / f) for m in ("flops", "bops") for f in (2, 4, 8)]
QUICK_BUDGETS = [Budget("flops", 1 / 4), Budget("flops", 1 / 8), Budget("bops", 1 / 8)]


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")


def spaces(quick: bool, model: str) -> SearchSpace:
    name = "search-quick.yaml" if quick else ("search-mnist.yaml" if model == "mnist-cnn" else "search-digits.yaml")
    return load_space(os.path.join(RECIPES, name))


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


def channels_section(model, calib, test_ds, db: str) -> list[str]:
    """Structured channel ratios (brainsurgeon.prune) under FLOP budgets: DP vs uniform, measured costs."""
    space = SearchSpace(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), channel_ratios=(0.25, 0.5, 0.75))
    t0 = time.perf_counter()
    print(f"\nchannel variants ({space.describe()}); costs re-measured on the pruned model")
    print(f"{'budget':<12}{'solver':<10}{'estimate':>9}{'measured':>9}{'acc':>8}{'acc+BN':>8}{'s':>6}  variants")
    failures, accs = [], {}
    for frac in (1 / 2, 1 / 4):
        for solver in ("uniform", "dp"):
            t1 = time.perf_counter()
            plan = search(model, space, Budget("flops", frac), calib, solver=solver, db=db)
            m = copy.deepcopy(model)
            apply_plan_(m, plan, calib, CalibOptions(bn_reestimate=False))
            plain = evaluate(m, test_ds)
            reestimate_batchnorm_(m, calib)
            accs[(frac, solver)] = bn = evaluate(m, test_ds)
            print(f"flops={frac:<6.4g}{solver:<10}{plan.info['cost_estimate']:>9.4f}{plan.info['cost']:>9.4f}"
                  f"{100 * plain:>8.2f}{100 * bn:>8.2f}{time.perf_counter() - t1:>6.1f}  {','.join(plan.variants)}")
            if plan.info["cost"] > frac + 1e-9:
                failures.append(f"channels flops={frac}: {solver} measured cost {plan.info['cost']} over budget")
        if accs[(frac, "dp")] < accs[(frac, "uniform")]:
            failures.append(f"channels flops={frac}: DP {accs[(frac, 'dp')]} < uniform {accs[(frac, 'uniform')]}")
    print(f"channel section: {time.perf_counter() - t0:.1f}s")
    for f in failures:
        print("FAIL", f)
    return failures


def pareto_plot(rows, dense_acc: float, path: str, model: str) -> None:
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
        ax.set_title(f"{model}: accuracy vs {metric.upper()} (BN re-estimated)")
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
    ap.add_argument("--model", choices=("digits-cnn", "mnist-cnn"), default="digits-cnn",
                    help="mnist-cnn uses recipes/search-mnist.yaml (SparseGPT/GPTQ); not with --quick")
    ap.add_argument("--db", default="out/search-db")
    ap.add_argument("--out", default="out/search_budgets.png")
    ap.add_argument("--section", choices=("all", "weights", "channels"), default="all",
                    help="weights: per-weight variants (sparsity, N:M, bits); channels: structured channel ratios")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if args.quick and args.model != "digits-cnn":
        ap.error("--quick runs on digits-cnn only")
    model, train_ds, test_ds = pretrained(args.model)
    calib = list(calibration_loader(train_ds, n=512, batch_size=128, seed=0))
    held = calibration_loader(train_ds, n=512, batch_size=512, seed=1).dataset  # AMC reward: train images
    dense_acc = evaluate(model, test_ds)
    failures: list[str] = []
    if args.section in ("all", "channels") and not args.quick:
        failures += channels_section(model, calib, test_ds, args.db + "-channels")
    if args.section == "channels":
        return 1 if failures else 0
    space = spaces(args.quick, args.model)
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
    print(f"\n{args.model}, dense test accuracy {100 * dense_acc:.2f}% ({len(test_ds)} test images); plans {how}")
    print(f"{'budget':<12}{'solver':<12}{'cost':>8}{'acc':>8}{'acc+BN':>8}{'solve s':>9}{'apply s':>9}  variants")
    for r in rows:
        print(f"{r['metric']}={r['budget']:<6.4g}{r['solver']:<12}{r['cost']:>8.4f}{100 * r['acc']:>8.2f}"
              f"{100 * r['acc_bn']:>8.2f}{r['t_solve']:>9.2f}{r['t_apply']:>9.2f}  {r['variants']}")
    pareto_plot(rows, dense_acc, args.out, args.model)
    print(f"\nPareto plot: {args.out}; total {time.perf_counter() - t_start:.1f}s")
    weight_failures: list[str] = []
    for b in budgets:
        get = {r["solver"]: r for r in rows if r["metric"] == b.metric and r["budget"] == b.fraction}
        if "DP" not in get:
            weight_failures.append(f"{b}: DP found no plan")
        elif "uniform" in get and get["DP"]["acc_bn"] < get["uniform"]["acc_bn"]:
            weight_failures.append(f"{b}: DP {get['DP']['acc_bn']:.4f} < uniform {get['uniform']['acc_bn']:.4f}")
        if "DP" in get and get["DP"]["cost"] > b.fraction + 1e-9:
            weight_failures.append(f"{b}: DP cost {get['DP']['cost']} over budget")
    for f in weight_failures:
        print("FAIL", f)
    return 1 if failures or weight_failures else 0


if __name__ == "__main__":
    sys.exit(main())
