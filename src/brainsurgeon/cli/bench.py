"""``brainsurgeon bench MODEL``: time a dense model against its compressed copy and compare with MACs.

    $ brainsurgeon bench digits-cnn --pack int8
    $ brainsurgeon bench torchvision:resnet50 --prune 0.3 --batch 1 32
    $ brainsurgeon bench torchvision:mobilenet_v2 --pack int8-dynamic --format json

The compressed copy is made here (round-to-nearest packing, magnitude sparsity with sparse
storage, or structural channel pruning), so the command needs no calibration data; the measured
speed-up is stated against the theoretical MAC ratio dense / compressed.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

EPILOG = """examples:
  # int8 weight-only packing of a built-in model (RTN grid), batch 1 and 32
  brainsurgeon bench digits-cnn --pack int8
  # ResNet-50 (random weights) with 30% of the channels of every coupled group removed
  brainsurgeon bench torchvision:resnet50 --prune 0.3 --batch 1 32 --image-size 224
  # 95% unstructured sparsity stored as CSR in every Linear, JSON output
  brainsurgeon bench mnist-cnn --sparsity 0.95 --sparse-format csr --format json
"""

PACKS = {"int8": dict(bits=8, group_size=0), "int4": dict(bits=4, group_size=0),
         "int8-dynamic": dict(bits=8, group_size=0, activations="dynamic_int8")}


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``bench`` on the top-level subparsers."""
    p = subparsers.add_parser(
        "bench", help="time dense vs compressed and compare with the MAC ratio", epilog=EPILOG,
        description="Time MODEL and a compressed copy of it (torch.utils.benchmark, fixed threads, "
                    "warm-up, median and IQR over interleaved rounds) at each batch size, and state "
                    "the measured speed-up against the theoretical MAC ratio.",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    p.add_argument("model", metavar="MODEL",
                   help="a built-in model (e.g. digits-cnn) or torchvision:NAME (random weights)")
    how = p.add_argument_group("compression (pick one)")
    how.add_argument("--pack", choices=sorted(PACKS), help="pack Linear/Conv2d layers (RTN grid)")
    how.add_argument("--group-size", type=int, default=None, metavar="N",
                     help="columns per scale for --pack (default: one scale per output channel)")
    how.add_argument("--prune", type=float, metavar="RATIO",
                     help="structural channel pruning: fraction of channels removed per coupled group")
    how.add_argument("--sparsity", type=float, metavar="S",
                     help="magnitude-prune every Linear to sparsity S and store it sparse")
    how.add_argument("--sparse-format", choices=("csr", "bsr", "bitmask"), default="csr",
                     help="storage for --sparsity (default csr; bsr prunes whole 16x16 blocks)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], metavar="B", help="batch sizes (default 1 32)")
    p.add_argument("--image-size", type=int, default=224, metavar="PX",
                   help="input resolution of torchvision models (default 224)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (default 1)")
    p.add_argument("--min-time", type=float, default=0.5, metavar="SEC",
                   help="seconds of timed runs per model and batch size (default 0.5)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default) or cpu: CPU time of the 1-thread process, robust on a busy, shared machine")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=run)


def build(name: str, image_size: int) -> tuple[Any, tuple[int, ...]]:
    """The dense model (eval mode) and the shape of one input sample.

    >>> model, shape = build("torchvision:resnet18", 224)      # shape == (3, 224, 224)
    """
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(f"bench: unknown torchvision classification model {arch!r}; e.g. "
                              f"torchvision:resnet50 (see torchvision.models.list_models())")
        return torchvision.models.get_model(arch, weights=None).eval(), (3, image_size, image_size)
    from ..models import build_model, registered_models

    if name not in registered_models():
        raise ConfigError(f"bench: unknown model {name!r}; use one of {registered_models()} "
                          f"or torchvision:NAME (e.g. torchvision:resnet50)")
    model = build_model(name, seed=0).eval()
    shape = getattr(model, "input_shape", None) or _input_shape(name)
    return model, tuple(shape)


def _input_shape(name: str) -> tuple[int, ...]:
    return {"digits-cnn": (1, 8, 8), "mnist-cnn": (1, 28, 28)}.get(name, (1, 28, 28))


def compress(model: Any, args: argparse.Namespace, sample: Any) -> tuple[Any, str]:
    """A compressed copy of `model` as the flags ask, and a one-line description."""
    import torch

    chosen = [f for f in ("pack", "prune", "sparsity") if getattr(args, f) is not None]
    if len(chosen) != 1:
        raise ConfigError(f"bench: pick exactly one of --pack, --prune, --sparsity (got {chosen or 'none'}); "
                          f"e.g. --pack int8")
    out = copy.deepcopy(model)
    if args.pack:
        import re

        from ..quant import Pack, pack_, pack_module

        kw = {**PACKS[args.pack], "rtn": True, "mse": False}
        if args.group_size is not None:
            kw["group_size"] = args.group_size
        cfg = Pack(**kw)
        dense_kept = []  # layers whose shape the kernel rejects (e.g. int4 needs out_features % 16 == 0)
        for name, m in out.named_modules():
            if name and type(m) in (torch.nn.Linear, torch.nn.Conv2d):
                try:
                    pack_module(m, cfg, name)
                except ConfigError:
                    dense_kept.append(name)
        rows = pack_(out, cfg, ignore=[re.escape(n) for n in dense_kept])
        kernels = sorted({r.kernel for r in rows})
        kept = f"; kept dense (shape rules): {', '.join(dense_kept)}" if dense_kept else ""
        return out, f"packed {args.pack} ({len(rows)} layers; kernels: {'; '.join(kernels)}{kept})"
    if args.prune is not None:
        from ..prune.api import prune_
        from ..prune.config import ChannelPruning

        prune_(out, ChannelPruning(ratio=args.prune, importance="l2"), example_inputs=sample)
        return out, f"structurally pruned {args.prune:.0%} of the channels of every coupled group"
    from ..quant import sparsify_storage_

    if not 0.0 < args.sparsity < 1.0:
        raise ConfigError(f"bench: --sparsity must be in (0, 1), got {args.sparsity}")
    block = 16 if args.sparse_format == "bsr" else 1
    with torch.no_grad():
        for m in out.modules():
            if type(m) is torch.nn.Linear:
                _magnitude_prune_(m.weight, args.sparsity, block)
    swapped = sparsify_storage_(out, args.sparse_format, block=16)
    return out, f"{args.sparsity:.0%} magnitude sparsity, {len(swapped)} Linear layers stored {args.sparse_format}"


def _magnitude_prune_(W: Any, sparsity: float, block: int) -> None:
    """Zero the smallest |w| (or the 16x16 blocks of smallest L2 norm when block > 1) in place."""
    if block > 1 and (W.shape[0] % block or W.shape[1] % block):
        return  # left dense; sparsify_storage_ will report the BSR shape rule for it
    score = W.abs() if block == 1 else W.reshape(W.shape[0] // block, block, -1, block).norm(dim=(1, 3))
    k = int(sparsity * score.numel())
    if k == 0:
        return
    keep = score > score.flatten().kthvalue(k).values
    if block > 1:
        keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    W.mul_(keep)


def run(args: argparse.Namespace) -> int:
    """Build, compress, time, print."""
    import torch

    from ..quant.measure import compare_latency, format_speed_table

    if any(b < 1 for b in args.batch) or args.threads < 1 or args.min_time <= 0:
        raise ConfigError("bench: --batch sizes and --threads must be >= 1 and --min-time > 0")
    dense, shape = build(args.model, args.image_size)
    gen = torch.Generator().manual_seed(0)
    compressed, what = compress(dense, args, torch.randn(1, *shape, generator=gen))
    inputs = {b: torch.randn(b, *shape, generator=gen) for b in args.batch}
    rows = compare_latency({"dense": dense, "compressed": compressed}, inputs, threads=args.threads,
                           min_run_time=args.min_time, rounds=3, clock=args.clock)
    if args.format == "json":
        print(json.dumps({"model": args.model, "compression": what, "threads": args.threads, "clock": args.clock,
                          "rows": [
            {"variant": r.variant, "batch": r.batch, "median_ms": r.timing.median_ms, "iqr_ms": r.timing.iqr_ms,
             "runs": r.timing.runs, "speedup": r.speedup, "mac_ratio": r.mac_ratio, "efficiency": r.efficiency}
            for r in rows]}, indent=2))
        return 0
    print(f"{args.model}: {what}; {args.threads} thread(s), {args.clock} clock")
    print(format_speed_table(rows))
    for r in rows:
        if r.variant == "compressed":
            print(f"batch {r.batch}: measured speed-up {r.speedup:.2f}x vs theoretical MAC ratio "
                  f"{r.mac_ratio:.2f}x ({r.efficiency:.0%} of it)")
    return 0
