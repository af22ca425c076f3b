"""``brainsurgeon distill``: compress a built-in model with a recipe, then recover its accuracy by
knowledge distillation from the dense model, keeping the compressed structure.

    $ brainsurgeon distill --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --epochs 2 --out out/d
    $ brainsurgeon distill --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --dry-run
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..config import Recipe
from ..errors import ConfigError
from .compress import read_recipe

EPILOG = """examples:
  # prune + quantize with a recipe, then KD fine-tune 2 epochs (zeros stay zero, weights stay on the grid)
  brainsurgeon distill --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --epochs 2 --out out/d
  # plain fine-tuning at the same budget, for comparison
  brainsurgeon distill --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --no-teacher --out out/ft
  # show the fine-tuning config that would run
  brainsurgeon distill --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --dry-run --format json
"""


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``distill`` on the top-level subparsers."""
    from ..models import registered_models

    p = subparsers.add_parser(
        "distill", help="compress with a recipe, then KD fine-tune from the dense model", epilog=EPILOG,
        description="Load a built-in model, compress a copy with a YAML recipe, fine-tune it with knowledge "
                    "distillation from the dense model (pruned zeros stay zero; with a quantize step the "
                    "weights train through fake-quant and end on their grid), keep the best state on a "
                    "validation split held out of the training data, and report test accuracy of dense, "
                    "compressed and fine-tuned. Writes OUT/report.json, OUT/history.json and OUT/model/ "
                    "(safetensors + manifest).",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    p.add_argument("--model", required=True, choices=registered_models(), help="built-in model")
    p.add_argument("--recipe", required=True, metavar="YAML", help="compression recipe applied first")
    p.add_argument("--out", metavar="DIR", help="output folder (required unless --dry-run)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default: 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default: 4)")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft KD term (default: 0.9)")
    p.add_argument("--no-teacher", action="store_true", help="plain fine-tuning with labels only")
    p.add_argument("--shift", type=int, default=0, metavar="PX",
                   help="augment: random shift of up to PX pixels, the same view for teacher and student (default: 0)")
    p.add_argument("--flip", action="store_true", help="augment: random left-right mirror (same view for both)")
    p.add_argument("--calib-samples", type=int, default=256, metavar="N", help="calibration images (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration subset and training (default: 0)")
    p.add_argument("--dry-run", action="store_true", help="print the fine-tuning config; train nothing")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=run)


def kd_config(recipe: Recipe, args: argparse.Namespace) -> Any:
    """The KD config for a recipe: QAT on the recipe's last quantize grid, zeros kept if it prunes.

    >>> kd_config(read_recipe("recipes/digits-obs75-obq4.yaml"), args).qat.bits
    4
    """
    from ..distill import KD
    from ..quant.qat import QAT

    quant = [s.method for s in recipe.steps if type(s.method).verb == "quantize"]
    prunes = any(type(s.method).verb == "sparsify" for s in recipe.steps)
    qat = None
    if quant:
        q = quant[-1]
        qat = QAT(bits=q.bits, sym=q.sym, group_size=q.group_size, init="existing")
    return KD(temperature=args.temperature, alpha=args.alpha, epochs=args.epochs, lr=args.lr,
              keep_zeros=prunes, qat=qat, seed=args.seed, shift=args.shift, flip=args.flip)


def run(args: argparse.Namespace) -> int:
    """Compress, distil, and print the report (or, with --dry-run, the config)."""
    recipe = read_recipe(args.recipe)
    cfg = kd_config(recipe, args)
    if args.dry_run:
        d = {"model": args.model, "steps": [s.method.describe() for s in recipe.steps], "distill": cfg.to_dict(),
             "teacher": None if args.no_teacher else "dense model"}
        print(json.dumps(d, indent=2) if args.format == "json" else
              f"{args.model}: {' -> '.join(d['steps'])} -> "
              f"{'fine-tune' if args.no_teacher else cfg.describe()} (keep zeros: {cfg.keep_zeros})")
        return 0
    if not args.out:
        raise ConfigError("distill: --out DIR is required (or pass --dry-run to only see the config)")
    import copy

    import torch

    from ..distill import distill
    from ..export import save
    from ..models import calibration_loader, evaluate, pretrained
    from ..report import write_atomic

    api = importlib.import_module("brainsurgeon.api")
    dense, train_ds, test_ds = pretrained(args.model)
    n_val = max(1, len(train_ds) // 10)
    perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed)).tolist()
    fit_ds, val_ds = torch.utils.data.Subset(train_ds, perm[n_val:]), torch.utils.data.Subset(train_ds, perm[:n_val])
    student = copy.deepcopy(dense)
    report = api.compress(student, recipe, calibration_loader(fit_ds, n=args.calib_samples, seed=args.seed))
    compressed = evaluate(student, test_ds)
    hist = distill(student, None if args.no_teacher else dense, fit_ds, cfg, val=val_ds)
    report.add_metric("accuracy", before=evaluate(dense, test_ds), after=evaluate(student, test_ds))
    report.add_metric("accuracy_compressed", after=compressed)
    report.notes.append(f"{hist.method}: {hist.steps} steps, best val {hist.best_metric:.4f} "
                        f"(start {hist.val_start:.4f})")
    print(json.dumps({"report": report.to_dict(), "history": hist.to_dict()}, indent=2)
          if args.format == "json" else report.to_table() + "\n\n" + hist.to_table())
    report.save(os.path.join(args.out, "report.json"))
    write_atomic(os.path.join(args.out, "history.json"), json.dumps(hist.to_dict(), indent=2))
    save(student, os.path.join(args.out, "model"), recipe=recipe, history=report)
    print(f"wrote {os.path.join(args.out, '')}{{report.json, history.json, model/}}", file=sys.stderr)
    return 0
