"""``brainsurgeon search``: find a per-layer plan for a budget on a built-in model; write it as a recipe.

    $ brainsurgeon search --model digits-cnn --space recipes/search-digits.yaml --budget flops=0.25 --out plan.yaml
    $ brainsurgeon compress --model digits-cnn --recipe plan.yaml --out out/searched
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

EPILOG = """examples:
  # 4x fewer FLOPs, least loss (DP over the per-layer database); the plan is a recipe
  brainsurgeon search --model digits-cnn --space recipes/search-digits.yaml --budget flops=0.25 --out plan.yaml
  brainsurgeon compress --model digits-cnn --recipe plan.yaml --out out/searched
  # 8x fewer bit operations with the AMC agent; database kept in out/db (resumable, re-used)
  brainsurgeon search --model digits-cnn --space recipes/search-quick.yaml --budget bops=8x --solver amc \\
      --db out/db --out plan.yaml --evaluate
  # joint weight + activation variants (8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a) at 12x fewer BOPs as OBC counts them
  brainsurgeon search --model digits-cnn --space recipes/search-joint.yaml --budget bops_obc=12x --out plan.yaml
  # build the database with 2 worker processes; JSON on stdout
  brainsurgeon search --model digits-cnn --space recipes/search-quick.yaml --budget flops=0.5 --executor process \\
      --out plan.yaml --format json
"""


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``search`` on the top-level subparsers."""
    from ..models import registered_models

    p = subparsers.add_parser(
        "search", help="find a per-layer compression plan under a budget", epilog=EPILOG,
        description="Build (or resume) the per-layer database of compressed variants of a built-in model on "
                    "calibration data from its training split, solve for the least-loss plan within the budget, "
                    "and write the plan as a recipe (apply it with `brainsurgeon compress --recipe`).",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    p.add_argument("--model", required=True, choices=registered_models(), help="built-in model")
    p.add_argument("--space", required=True, metavar="YAML", help="search space file (recipes/search-*.yaml)")
    p.add_argument("--budget", required=True, metavar="METRIC=X",
                   help="flops|bops|bops_obc|bytes|params|latency as a fraction of dense (flops=0.25) or a factor "
                        "(bops=8x); bops counts weight x activation bits, bops_obc OBC's linear count")
    p.add_argument("--solver", default="dp",
                   choices=("dp", "spdy", "uniform", "global-magnitude", "amc", "amc-resource", "amc-accuracy"),
                   help="dp (default), spdy (DP reweighted by a local search on the stitched model's calibration "
                        "KL, seeded with the uniform plan: never above uniform's calibration KL), uniform, "
                        "global-magnitude, amc (resource-constrained), amc-accuracy")
    p.add_argument("--out", metavar="YAML", help="where to write the plan (required unless --dry-run)")
    p.add_argument("--db", metavar="DIR", help="database folder (default: out/search-db/<model>)")
    p.add_argument("--executor", default="inline", choices=("inline", "process", "ray"),
                   help="how database entries are computed (default: inline)")
    p.add_argument("--workers", type=int, default=2, help="processes for --executor process (default: 2)")
    p.add_argument("--calib-samples", type=int, default=512, metavar="N",
                   help="calibration images from the training split (default: 512)")
    p.add_argument("--evaluate", action="store_true",
                   help="apply the plan to a copy and report test accuracy before/after")
    p.add_argument("--dry-run", action="store_true",
                   help="show the layers and how many variants each gets; compute nothing")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=run)


def _dry_run(model_name: str, space: Any) -> dict[str, Any]:
    from ..calib import supported
    from ..models import build_model
    from ..search import layer_variants

    model = build_model(model_name)
    rows = []
    for n, m in model.named_modules():
        if n and supported(m):
            vs = layer_variants(space, int(m.weight.shape[1]))
            rows.append({"name": n, "shape": list(m.weight.shape), "variants": [v.name for v in vs]})
    return {"model": model_name, "space": space.describe(), "layers": rows}


def _format_plan(plan: Any, extra: dict[str, Any]) -> str:
    lines = [", ".join(f"{k}={v}" for k, v in plan.info.items() if k != "db")]
    for (name, cfgs), v in zip(plan.layers, plan.variants or [""] * len(plan.layers), strict=True):
        lines.append(f"  {name:<16} {v:<16} {' + '.join(c.describe() for c in cfgs) or 'dense'}")
    lines += [f"  {n:<16} {'(not searched)':<16} dense" for n in plan.skipped]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Search (or, with --dry-run, list the variants) and write the plan."""
    from ..search import load_space

    if not os.path.isfile(args.space):
        raise ConfigError(f"search space file {args.space!r} not found; e.g. --space recipes/search-digits.yaml")
    space = load_space(args.space)
    if args.dry_run:
        d = _dry_run(args.model, space)
        if args.format == "json":
            print(json.dumps(d, indent=2))
        else:
            print(d["space"])
            for r in d["layers"]:
                print(f"  {r['name']:<16} {tuple(r['shape'])!s:<18} {len(r['variants'])} variants")
        return 0
    if not args.out:
        raise ConfigError("search: --out PLAN.yaml is required (or pass --dry-run)")
    search_mod = importlib.import_module("brainsurgeon.search")
    from ..models import calibration_loader, evaluate, pretrained

    model, train_ds, test_ds = pretrained(args.model)
    calib = list(calibration_loader(train_ds, n=args.calib_samples, seed=0))
    held = calibration_loader(train_ds, n=512, batch_size=512, seed=1).dataset
    eval_fn = (lambda m: evaluate(m, held)) if args.solver.startswith("amc") else None
    executor = search_mod.make_executor(args.executor, args.workers)
    try:
        plan = search_mod.search(model, space, args.budget, calib, eval_fn=eval_fn, solver=args.solver,
                                 db=args.db or os.path.join("out", "search-db", args.model), executor=executor)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    extra: dict[str, Any] = {}
    if args.evaluate:
        m = copy.deepcopy(model)
        search_mod.apply_plan_(m, plan, calib)
        extra = {"test accuracy dense": round(evaluate(model, test_ds), 4),
                 "test accuracy planned": round(evaluate(m, test_ds), 4)}
    plan.save(args.out)
    if args.format == "json":
        print(json.dumps({"info": plan.info, "layers": [
            {"name": n, "variant": v, "configs": [c.to_dict() for c in cs]}
            for (n, cs), v in zip(plan.layers, plan.variants, strict=True)], "skipped": list(plan.skipped),
            **extra}, indent=2))
    else:
        print(_format_plan(plan, extra))
    print(f"wrote {args.out} (apply: brainsurgeon compress --model {args.model} --recipe {args.out} --out DIR)",
          file=sys.stderr)
    return 0
