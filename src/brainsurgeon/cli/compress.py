"""``brainsurgeon compress``: apply a YAML recipe to a built-in model and write model + report.

    $ brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --out out/c
    $ brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --dry-run
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..config import Recipe, dump_recipe, load_recipe
from ..errors import ConfigError

SAVE_FORMATS = ("brainsurgeon", "hf", "compressed-tensors", "gptq", "gguf", "onnx")
EPILOG = """examples:
  # prune 75% with ExactOBS, then quantize to 4 bits with OBQ; writes the model, report.json/.html
  brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --out out/c
  # check the recipe and the model and show the plan, without compressing
  brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --dry-run
  # machine-readable report on stdout
  brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --out out/c --format json
  # also write the compressed model as ONNX (OUT/model.onnx, checked with onnxruntime)
  brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --out out/c --save-format onnx
"""


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``compress`` on the top-level subparsers."""
    from ..models import registered_models

    p = subparsers.add_parser(
        "compress", help="compress a model with a YAML recipe", epilog=EPILOG,
        description="Load a built-in model (trained on first use and cached), apply a YAML recipe "
                    "with calibration data from its training split, measure test accuracy before "
                    "and after, and write OUT/model/ (safetensors + manifest, reload with brainsurgeon.load), "
                    "OUT/report.json, OUT/report.html and OUT/recipe.yaml.",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    p.add_argument("--model", required=True, choices=registered_models(), help="built-in model")
    p.add_argument("--recipe", required=True, metavar="YAML", help="path of a recipe file")
    p.add_argument("--out", metavar="DIR", help="output folder (required unless --dry-run)")
    p.add_argument("--calib-samples", type=int, default=256, metavar="N",
                   help="calibration images drawn from the training split (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (default: 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and the model and print the plan; compress nothing")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--save-format", choices=SAVE_FORMATS, default="brainsurgeon",
                   help="how OUT/model is written (bs.save's format=; default: brainsurgeon). compressed-tensors, "
                        "gptq and gguf need an HF transformers model and take the grid of the recipe's last "
                        "quantize step")
    p.set_defaults(func=run)


def read_recipe(path: str) -> Recipe:
    """Load a recipe file, with a clear error when the path does not exist.

    >>> read_recipe("recipes/digits-obs75-obq4.yaml").steps[0].method.describe()
    'ExactOBS 75% unstructured'
    """
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file {path!r} not found; pass the path of a YAML recipe, "
                          f"e.g. --recipe recipes/digits-obs75-obq4.yaml")
    try:
        return load_recipe(path)
    except ConfigError as e:
        raise ConfigError(f"recipe {path!r}: {e}") from e


def plan(model_name: str, recipe: Recipe) -> dict[str, Any]:
    """What a run would do: the model's weight layers and the recipe's steps, as plain data.

    >>> plan("digits-cnn", read_recipe("recipes/digits-obs75-obq4.yaml"))["steps"][1]["method"]
    'OBQ 4-bit'
    """
    from torch import nn

    from ..models import build_model

    model = build_model(model_name)
    layers = [{"name": n, "type": type(m).__name__, "shape": list(m.weight.shape)}
              for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    steps, reshaped = [], 0
    for i, s in enumerate(recipe.steps, 1):
        step: dict[str, Any] = {"method": s.method.describe(), "ignore": list(s.ignore),
                                "overrides": [{"match": p, "method": c.describe()} for p, c in s.overrides]}
        step.update(_check_step(model, s, reshaped, recipe.calib))
        if type(s.method).verb in ("prune", "factorize", "share", "pack") and not reshaped:
            reshaped = i
        steps.append(step)
    return {"model": model_name, "params": sum(p.numel() for p in model.parameters()),
            "layers": layers, "steps": steps, "calib": recipe.to_dict()["calib"],
            "refusals": [r for st in steps for r in st["refusals"]]}


def _check_step(model: Any, step: Any, reshaped: int, options: Any = None) -> dict[str, Any]:
    """The layers a step compresses and every refusal, planned exactly as the run plans them.

    Weight steps use the run's own planner (:func:`brainsurgeon.planning.check_step`); after a step
    that changes shapes (prune/factorize/share/pack) the plan uses the shapes before it (noted).
    """
    from ..errors import BrainsurgeonError
    from ..planning import check_step

    verb = type(step.method).verb
    out: dict[str, Any] = {"layers": [], "notes": [], "refusals": []}
    if reshaped:
        out["notes"].append(f"planned on the layer shapes before step {reshaped}, which changes them")
    try:
        if verb in ("sparsify", "quantize"):
            plan, notes, refusals = check_step(model, step, options)
            out["layers"], out["notes"] = list(plan), out["notes"] + notes
            out["refusals"] = [str(e) for e in refusals]
        elif verb == "factorize":
            from ..lowrank.api import plan_factorization

            plan, notes = plan_factorization(model, step.method, step.ignore, step.overrides)
            out["layers"], out["notes"] = list(plan), out["notes"] + notes
        elif verb == "share":
            from ..share.api import plan_sharing

            out["layers"] = list(plan_sharing(model, step.method, step.ignore, step.overrides))
        else:
            out["notes"].append(f"the {verb} step chooses its layers when it runs")
    except BrainsurgeonError as e:
        out["refusals"].append(str(e))
    return out


def _format_plan(p: dict[str, Any]) -> str:
    lines = [f"model {p['model']}: {p['params']:,} parameters, {len(p['layers'])} weight layers"]
    lines += [f"  {ly['name']:<20} {ly['type']:<8} {tuple(ly['shape'])}" for ly in p["layers"]]
    lines.append("steps:")
    for i, s in enumerate(p["steps"], 1):
        lines.append(f"  {i}. {s['method']}")
        if s["ignore"]:
            lines.append(f"     ignore: {', '.join(s['ignore'])}")
        lines += [f"     override {o['match']}: {o['method']}" for o in s["overrides"]]
        if s["layers"]:
            lines.append(f"     layers: {', '.join(s['layers'])}")
        lines += [f"     note: {n}" for n in s["notes"]]
        lines += [f"     REFUSED: {r}" for r in s["refusals"]]
    lines.append("calib: " + ", ".join(f"{k}={v}" for k, v in p["calib"].items()))
    return "\n".join(lines)


def _format_options(fmt: str, recipe: Recipe, test_ds: Any) -> dict[str, Any]:
    """The writer options a --save-format needs: example inputs (onnx) or the recipe's last quantize grid."""
    if fmt == "onnx":
        return {"example_inputs": (test_ds[0][0].unsqueeze(0),)}
    if fmt == "hf":
        return {}
    quant = [s.method for s in recipe.steps if getattr(s.method, "verb", "") == "quantize"]
    return {"quant": quant[-1] if quant else None}


def run(args: argparse.Namespace) -> int:
    """Compress (or, with --dry-run, only plan) and print the report."""
    recipe = read_recipe(args.recipe)
    if args.dry_run:
        p = plan(args.model, recipe)
        msg = f"the run would refuse {len(p['refusals'])} layer(s): " + " | ".join(p["refusals"])
        if p["refusals"]:
            p["error"] = {"type": "ConfigError", "message": msg, "exit_code": 2}
        print(json.dumps(p, indent=2) if args.format == "json" else _format_plan(p))
        if p["refusals"]:
            print(f"error: {msg}", file=sys.stderr)
            return 2
        return 0
    if not args.out:
        raise ConfigError("compress: --out DIR is required (or pass --dry-run to only see the plan)")
    api = importlib.import_module("brainsurgeon.api")
    from ..export import save
    from ..models import calibration_loader, evaluate, pretrained
    from ..report import write_atomic

    model, train_ds, test_ds = pretrained(args.model)
    fmt = getattr(args, "save_format", "brainsurgeon")
    if fmt in ("hf", "compressed-tensors", "gptq", "gguf") and not hasattr(model, "config"):
        raise ConfigError(f"compress: --save-format {fmt} writes a Hugging Face model, but {args.model} is not one; "
                          f"use --save-format brainsurgeon or onnx")
    calib = calibration_loader(train_ds, n=args.calib_samples, seed=args.seed)
    before = evaluate(model, test_ds)
    # data= is only read by distill (KD) steps; the test split stays held out for the accuracy below
    report = api.compress(model, recipe, calib, data=train_ds)
    report.add_metric("accuracy", before=before, after=evaluate(model, test_ds))
    print(report.to_json() if args.format == "json" else report.to_table())
    report.save(os.path.join(args.out, "report.json"))
    save(model, os.path.join(args.out, "model"), recipe=recipe, history=report)
    extra = ""
    if fmt != "brainsurgeon":
        extra = "model.onnx" if fmt == "onnx" else f"model-{fmt}/"
        save(model, os.path.join(args.out, extra.rstrip("/")), format=fmt, **_format_options(fmt, recipe, test_ds))
        extra = ", " + extra
    write_atomic(os.path.join(args.out, "recipe.yaml"), dump_recipe(recipe))
    html = report.to_html(os.path.join(args.out, "report.html"))
    print(f"wrote {os.path.join(args.out, '')}{{model/{extra}, report.json, recipe.yaml}} and {html}", file=sys.stderr)
    return 0
