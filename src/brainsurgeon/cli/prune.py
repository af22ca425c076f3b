"""``brainsurgeon prune``: remove channels from a built-in model, measure it, write model + report.

    $ brainsurgeon prune --model digits-cnn --ratio 0.5 --importance group_l2 --out out/p
    $ brainsurgeon prune --model digits-cnn --ratio 0.5 --dry-run
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

INPUT_SHAPES = {"digits-cnn": (1, 1, 8, 8), "mnist-cnn": (1, 1, 28, 28)}  # one example image per built-in model

EPILOG = """examples:
  # remove 50% of the channels of every coupled group by DepGraph group L2 norm
  brainsurgeon prune --model digits-cnn --ratio 0.5 --importance group_l2 --out out/p
  # global ranking with a per-layer guard, OBS saliency and OBS reconstruction of the consumers
  brainsurgeon prune --model digits-cnn --ratio 0.5 --scope global --importance obs --reconstruct obs --out out/p
  # then fine-tune 3 epochs on the training split
  brainsurgeon prune --model digits-cnn --ratio 0.5 --finetune-epochs 3 --out out/p --format json
  # only check the options and show the model's size and MACs
  brainsurgeon prune --model digits-cnn --ratio 0.5 --dry-run
"""


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``prune`` on the top-level subparsers."""
    from ..models import registered_models
    from ..prune import registered_importances

    p = subparsers.add_parser(
        "prune", help="remove channels (structured pruning) from a model", epilog=EPILOG,
        description="Load a built-in model (trained on first use and cached), remove whole channels with "
                    "every coupled slice (DependencyGraph), optionally fine-tune, measure test accuracy "
                    "before and after, and write OUT/report.json, OUT/model/ "
                    "(safetensors + manifest; brainsurgeon.load rebuilds the pruned shapes) and OUT/prune.yaml.",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    p.add_argument("--model", required=True, choices=registered_models(), help="built-in model")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed (default: 0.5)")
    p.add_argument("--importance", default="group_l2", choices=registered_importances(),
                   help="importance criterion (default: group_l2)")
    p.add_argument("--scope", choices=("local", "global"), default="local",
                   help="ratio per group (local) or one global ranking (default: local)")
    p.add_argument("--max-layer-ratio", type=float, default=0.9,
                   help="global scope: no group loses more than this fraction (default: 0.9)")
    p.add_argument("--steps", type=int, default=1, help="iterative pruning steps (default: 1)")
    p.add_argument("--round-to", type=int, default=1, help="kept channels a multiple of this (default: 1)")
    p.add_argument("--ignore", nargs="*", default=[], metavar="REGEX",
                   help="modules whose output channels are kept (names as in named_modules)")
    p.add_argument("--reconstruct", choices=("none", "obs"), default="none",
                   help="re-solve consumer layers by least squares on calibration data (default: none)")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                   help="fine-tune the pruned model N epochs on the training split (default: 0)")
    p.add_argument("--calib-samples", type=int, default=256, metavar="N",
                   help="calibration images drawn from the training split (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration subset and random scores")
    p.add_argument("--out", metavar="DIR", help="output folder (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="validate the options, show sizes; prune nothing")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The ChannelPruning config the options describe (validated)."""
    from ..prune import ChannelPruning

    return ChannelPruning(ratio=args.ratio, importance=args.importance, scope=args.scope,
                          max_layer_ratio=args.max_layer_ratio, steps=args.steps, round_to=args.round_to,
                          ignore=tuple(args.ignore), reconstruct=args.reconstruct, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Prune (or, with --dry-run, only validate and measure) and print the report."""
    import torch
    import yaml

    from ..export import save
    from ..models import build_model, calibration_loader, evaluate, pretrained, train
    from ..prune import measure, prune_table
    from ..report import write_atomic

    cfg = config_from_args(args)
    if args.finetune_epochs < 0:
        raise ConfigError(f"prune: --finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.dry_run:
        model = build_model(args.model)
        c = measure(model, torch.zeros(INPUT_SHAPES[args.model]))
        plan = {"model": args.model, "params": c.total_params, "macs": c.total_macs, "config": cfg.to_dict()}
        print(json.dumps(plan, indent=2) if args.format == "json"
              else f"model {args.model}: {c.total_params:,} params, {c.total_macs:,} MACs\n{cfg.describe()}")
        return 0
    if not args.out:
        raise ConfigError("prune: --out DIR is required (or pass --dry-run to only check the options)")
    api = importlib.import_module("brainsurgeon.prune")
    model, train_ds, test_ds = pretrained(args.model)
    calib = calibration_loader(train_ds, n=args.calib_samples, seed=args.seed)
    example = train_ds[0][0].unsqueeze(0)  # (1, C, H, W)
    before = evaluate(model, test_ds)
    report = api.prune_(model, cfg, example, calib=calib if cfg.needs_calib else None)
    report.add_metric("accuracy", before=before, after=evaluate(model, test_ds))
    if args.finetune_epochs:
        train(model, train_ds, epochs=args.finetune_epochs, seed=args.seed)
        report.add_metric("accuracy_finetuned", before=before, after=evaluate(model, test_ds))
    print(report.to_json() if args.format == "json" else prune_table(report))
    report.save(os.path.join(args.out, "report.json"))
    save(model, os.path.join(args.out, "model"), recipe=cfg.to_dict(), history=report)
    write_atomic(os.path.join(args.out, "prune.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"wrote {os.path.join(args.out, '')}{{report.json, model/, prune.yaml}}", file=sys.stderr)
    return 0
