"""Budget search: DP vs uniform vs global magnitude vs AMC (both modes) at 2x/4x/8x FLOPs and BOPs.

    python bench/search_budgets.py            # digits CNN: channels section + full space, plans applied with the verbs
    python bench/search_budgets.py --section channels   # structured channel ratios only (DP vs uniform)
    python bench/search_budgets.py --model mnist-cnn    # MNIST CNN, SparseGPT/GPTQ space (10k test images)
    python bench/search_budgets.py --model fashion-resnet20   # CIFAR-style ResNet-20 on Fashion-MNIST (10k test)
    python bench/search_budgets.py --quick    # reduced space, plans stitched from the database (< 1 min);
                                              # exit 1 if DP loses to uniform at any budget
    python bench/search_budgets.py --model fashion-resnet20 --budgets flops=8x --stitch   # one budget, stitched

For every budget (fraction of the dense model's FLOPs or BOPs over its conv/linear layers;
BOPs = MACs x weight bits x activation bits, activations stay fp32) each solver returns a plan;
the plan is applied (full: `apply_plan_`, i.e. the verbs re-solve each layer sequentially; quick:
the database weights are stitched in) and test accuracy is measured before and after BatchNorm
re-estimation on the calibration data (--stitch: full runs stitch the database weights too).
SPDY (full runs; Frantar & Alistarh, ICML 2022) searches per-layer weights of DP's scores by the
stitched model's accuracy after BN re-estimation. AMC's reward and SPDY's objective use 512
held-out *training* images, never the test set. The database is built once per space
(resumable) under --db. A Pareto plot (accuracy vs cost) is written to --out.

The check (exit 1), per budget and per column (without / with BN re-estimation): DP fails when
uniform is *significantly* more accurate on the test set (one-sided exact McNemar test on the
images the two plans disagree on, p < 0.05), or DP is over budget. A raw accuracy gap of one or
two test images is not a loss: BatchNorm re-estimation alone moves the *dense* MNIST CNN by
4 images of 10,000, and at the mildest budgets both plans are lossless. The table marks budgets
where DP is significantly better ("DP>") and where uniform is ("U>").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
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
    SPDY,
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
    spdy_plan,
    stitch_,
    uniform_plan,
)

BUDGETS = [Budget(m, 1 / f) for m in ("flops", "bops") for f in (2, 4, 8)]
QUICK_BUDGETS = [Budget("flops", 1 / 4), Budget("flops", 1 / 8), Budget("bops", 1 / 8)]


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")


def spaces(quick: bool, model: str) -> SearchSpace:
    name = "search-quick.yaml" if quick else ("search-digits.yaml" if model == "digits-cnn" else "search-mnist.yaml")
    space = load_space(os.path.join(RECIPES, name))
    if "resnet" in model:  # 20 layers x 16 variants: measure each entry's distortion on one batch of 128
        space = dataclasses.replace(space, model_loss_batches=1)
    return space


def solvers(quick: bool, model, table, stitched, episodes: int, spdy_stitched=None):
    amc = AMC(episodes=40 if quick else episodes, warmup=10 if quick else episodes // 4)
    extra = {} if spdy_stitched is None else {
        "SPDY": lambda b: spdy_plan(table, b, spdy_stitched.error, SPDY(evals=100))}
    return {
        "uniform": lambda b: uniform_plan(table, b),
        "global-mag": lambda b: global_magnitude_plan(model, table, b),
        "DP": lambda b: dp_plan(table, b),
        "AMC-rc": lambda b: AMCSearch(amc, table, b, stitched.error).run(),
        "AMC-ag": lambda b: AMCSearch(AMC(**{**_fields(amc), "mode": "accuracy"}), table, b, stitched.error).run(),
    } | extra


def _fields(cfg):
    d = cfg.to_dict()
    d.pop("type")
    d.pop("version")
    return d


@torch.no_grad()
def correct(model, test_ds) -> torch.Tensor:
    """Per test image: whether `model` classifies it right (bool)."""
    model.eval()
    x, y = test_ds.tensors
    return torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)]) == y


def mcnemar_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """One-sided exact McNemar p-value that `b` is more accurate than `a` (paired per-image correctness).

    Of the n images the two classifiers disagree on, b is right on k; p = P(X >= k), X ~ Bin(n, 1/2).
    """
    n, k = int((a != b).sum()), int((b & ~a).sum())
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n if n else 1.0


def measure(model, plan, table, calib, test_ds, stitch: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(per-image correctness without BN re-estimation, with it, seconds to apply)."""
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    if stitch and plan.variants and not plan.variants[0].startswith("mag@"):
        stitch_(m, plan, table)
    else:
        apply_plan_(m, plan, calib, CalibOptions(bn_reestimate=False))
    sec = time.perf_counter() - t0
    plain = correct(m, test_ds)
    reestimate_batchnorm_(m, calib)
    return plain, correct(m, test_ds), sec


def bn_copy(model, calib):
    """A copy of `model` with BatchNorm statistics re-estimated on `calib` (SPDY's objective)."""
    m = copy.deepcopy(model)
    reestimate_batchnorm_(m, calib)
    return m


def verdict(dp: torch.Tensor, uni: torch.Tensor) -> str:
    """'DP>' / 'U>' when one plan is significantly more accurate (McNemar, p < 0.05), else '='."""
    return "DP>" if mcnemar_p(uni, dp) < 0.05 else ("U>" if mcnemar_p(dp, uni) < 0.05 else "=")


def channels_section(model, calib, test_ds, db: str, held, episodes: int) -> list[str]:
    """Structured channel ratios (brainsurgeon.prune) under FLOP budgets: DP vs uniform vs AMC, measured costs.

    AMC walks the real model (prunes layer by layer, measuring the remaining FLOPs), `episodes` episodes.
    """
    solvers = ("uniform", "dp") + (("amc-resource", "amc-accuracy") if episodes else ())
    amc = AMC(episodes=max(episodes, 2), warmup=episodes // 4)
    space = SearchSpace(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), channel_ratios=(0.25, 0.5, 0.75))
    t0 = time.perf_counter()
    print(f"\nchannel variants ({space.describe()}); costs re-measured on the pruned model")
    print(f"{'budget':<12}{'solver':<14}{'estimate':>9}{'measured':>9}{'acc':>8}{'acc+BN':>8}{'s':>6}  variants")
    failures, got = [], {}
    for frac in (1 / 2, 1 / 4):
        for solver in solvers:
            t1 = time.perf_counter()
            try:
                plan = search(model, space, Budget("flops", frac), calib, solver=solver, db=db, amc=amc,
                              eval_fn=(lambda m: evaluate(m, held)) if solver.startswith("amc") else None)
            except BudgetInfeasibleError as e:
                print(f"flops={frac:<6.4g}{solver:<14}infeasible: {str(e)[:90]}")
                continue
            m = copy.deepcopy(model)
            apply_plan_(m, plan, calib, CalibOptions(bn_reestimate=False))
            plain = correct(m, test_ds)
            reestimate_batchnorm_(m, calib)
            got[(frac, solver)] = bn = correct(m, test_ds)
            est = plan.info.get("cost_estimate", plan.info["cost"])
            print(f"flops={frac:<6.4g}{solver:<14}{est:>9.4f}{plan.info['cost']:>9.4f}"
                  f"{100 * plain.float().mean():>8.2f}{100 * bn.float().mean():>8.2f}{time.perf_counter() - t1:>6.1f}"
                  f"  {','.join(plan.variants)}")
            if plan.info["cost"] > frac + 1e-9:
                failures.append(f"channels flops={frac}: {solver} measured cost {plan.info['cost']} over budget")
        pair = got.get((frac, "dp")), got.get((frac, "uniform"))
        if None not in pair and verdict(*pair) == "U>":
            failures.append(f"channels flops={frac}: uniform significantly more accurate than DP (after BN)")
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


MODELS = ("digits-cnn", "mnist-cnn", "fashion-cnn", "mnist-resnet20", "fashion-resnet20")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=MODELS, default="digits-cnn",
                    help="all but digits-cnn use recipes/search-mnist.yaml (SparseGPT/GPTQ); not with --quick")
    ap.add_argument("--db", default=None, help="database folder (default out/search-db-MODEL)")
    ap.add_argument("--out", default=None, help="Pareto plot (default out/search/MODEL.png)")
    ap.add_argument("--amc-episodes", type=int, default=0, help="AMC episodes (default 200; 50 for ResNet-20)")
    ap.add_argument("--budgets", default="", help="comma-separated budgets instead of the default list, e.g. flops=8x")
    ap.add_argument("--stitch", action="store_true", help="full runs: stitch database weights instead of apply_plan_")
    ap.add_argument("--section", choices=("all", "weights", "channels"), default="all",
                    help="weights: per-weight variants (sparsity, N:M, bits); channels: structured channel ratios")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if args.quick and args.model != "digits-cnn":
        ap.error("--quick runs on digits-cnn only")
    db = args.db or f"out/search-db-{args.model}{'-quick' if args.quick else ''}"
    out = args.out or f"out/search/{args.model}{'-quick' if args.quick else ''}.png"
    episodes = args.amc_episodes or (50 if "resnet" in args.model else 200)
    model, train_ds, test_ds = pretrained(args.model)
    calib = list(calibration_loader(train_ds, n=512, batch_size=128, seed=0))
    held = calibration_loader(train_ds, n=512, batch_size=512, seed=1).dataset  # AMC reward: train images
    dense = correct(model, test_ds)
    m = copy.deepcopy(model)
    reestimate_batchnorm_(m, calib)
    dense_bn = correct(m, test_ds)
    print(f"{args.model}: dense test accuracy {100 * dense.float().mean():.2f}%, after BN re-estimation on the "
          f"512 calibration images {100 * dense_bn.float().mean():.2f}% ({len(test_ds)} test images)")
    failures: list[str] = []
    ch_episodes = 0 if "resnet" in args.model else max(episodes // 5, 16)  # a walk step traces the graph
    if args.section == "channels":
        return 1 if channels_section(model, calib, test_ds, db + "-channels", held, ch_episodes) else 0
    space = spaces(args.quick, args.model)
    t0 = time.perf_counter()
    table = build_database(model, space, calib, db)
    n_entries = sum(len(v) for v in table.entries.values())
    print(f"database: {n_entries} entries over {len(table.layers)} layers ({table.computed} computed now) "
          f"in {time.perf_counter() - t0:.1f}s at {db}")
    stitched = StitchedModel(model, table, calib, eval_fn=lambda m: evaluate(m, held))
    spdy_stitched = None if args.quick else StitchedModel(model, table, calib,
                                                          eval_fn=lambda m: evaluate(bn_copy(m, calib), held))
    rows = []
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    if args.budgets:
        budgets = [Budget.parse(b) for b in args.budgets.split(",")]
    for budget in budgets:
        for name, solve in solvers(args.quick, model, table, stitched, episodes, spdy_stitched).items():
            t0 = time.perf_counter()
            try:
                plan = solve(budget)
            except BudgetInfeasibleError as e:
                print(f"{budget} {name}: infeasible ({str(e)[:80]})")
                continue
            t_solve = time.perf_counter() - t0
            plain, bn, t_apply = measure(model, plan, table, calib, test_ds, stitch=args.quick or args.stitch)
            rows.append({"metric": budget.metric, "budget": budget.fraction, "solver": name, "cost": plan.info["cost"],
                         "ok": plain, "ok_bn": bn, "acc": float(plain.float().mean()),
                         "acc_bn": float(bn.float().mean()), "t_solve": t_solve, "t_apply": t_apply,
                         "variants": ",".join(plan.variants)})
            print(f"  {budget} {name}: cost {plan.info['cost']:.4f} acc {100 * rows[-1]['acc']:.2f} "
                  f"+BN {100 * rows[-1]['acc_bn']:.2f} ({t_solve + t_apply:.0f}s)", flush=True)
    how = ("stitched from the database" if args.quick or args.stitch
           else "applied with apply_plan_ (sequential re-solve)")
    print(f"\n{args.model}, dense test accuracy {100 * dense.float().mean():.2f}% / "
          f"{100 * dense_bn.float().mean():.2f}% with BN re-estimation ({len(test_ds)} test images); plans {how}")
    print(f"{'budget':<12}{'solver':<12}{'cost':>8}{'acc':>8}{'acc+BN':>8}{'vs U':>6}{'solve s':>9}{'apply s':>9}"
          f"  variants")
    for r in rows:
        uni = next((u for u in rows if u["solver"] == "uniform" and u["metric"] == r["metric"]
                    and u["budget"] == r["budget"]), None)
        vs = "" if uni is None or r is uni else f"{verdict(r['ok'], uni['ok'])}/{verdict(r['ok_bn'], uni['ok_bn'])}"
        vs = vs.replace("DP>", "+").replace("U>", "-")
        print(f"{r['metric']}={r['budget']:<6.4g}{r['solver']:<12}{r['cost']:>8.4f}{100 * r['acc']:>8.2f}"
              f"{100 * r['acc_bn']:>8.2f}{vs:>6}{r['t_solve']:>9.2f}{r['t_apply']:>9.2f}  {r['variants']}")
    print("vs U: significance against uniform (McNemar p < 0.05) without/with BN: + better, - worse, = no difference")
    pareto_plot(rows, float(dense.float().mean()), out, args.model)
    print(f"\nPareto plot: {out}; total {time.perf_counter() - t_start:.1f}s")
    weight_failures: list[str] = []
    for b in budgets:
        get = {r["solver"]: r for r in rows if r["metric"] == b.metric and r["budget"] == b.fraction}
        if "DP" not in get:
            weight_failures.append(f"{b}: DP found no plan")
            continue
        for col in ("ok", "ok_bn"):
            if "uniform" in get and verdict(get["DP"][col], get["uniform"][col]) == "U>":
                u, d = (float(get[k][col].float().mean()) for k in ("uniform", "DP"))
                weight_failures.append(f"{b}: uniform significantly more accurate than DP ({col}: {u:.4f} vs {d:.4f})")
        if get["DP"]["cost"] > b.fraction + 1e-9:
            weight_failures.append(f"{b}: DP cost {get['DP']['cost']} over budget")
    for f in weight_failures:
        print("FAIL", f)
    if args.section == "all" and not args.quick:
        failures += channels_section(model, calib, test_ds, db + "-channels", held, ch_episodes)
        if not ch_episodes:
            print("(AMC channel walk not run on ResNet-20: 20 layers, one graph trace per step)")
    return 1 if failures or weight_failures else 0


if __name__ == "__main__":
    sys.exit(main())
