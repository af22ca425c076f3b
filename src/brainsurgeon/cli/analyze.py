"""``brainsurgeon analyze``: show the dependency groups of a model and the ops that block pruning.

    $ brainsurgeon analyze --model digits-cnn
    $ brainsurgeon analyze --model torchvision:resnet18 --input-shape 1,3,64,64 --ignore fc --verbose
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

EPILOG = """examples:
  # groups of a built-in model (every coupled slice with --verbose)
  brainsurgeon analyze --model digits-cnn --verbose
  # any torchvision model, random weights, with an input shape
  brainsurgeon analyze --model torchvision:mobilenet_v3_small --input-shape 1,3,64,64 --ignore classifier.3
  # machine-readable
  brainsurgeon analyze --model torchvision:resnet18 --format json
"""

_BUILTIN_SHAPES = {"digits-cnn": (1, 1, 8, 8)}


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``analyze`` on the top-level subparsers."""
    p = subparsers.add_parser(
        "analyze", help="show the dependency groups and blocked ops of a model", epilog=EPILOG,
        description="Trace a model at the ATen level (DependencyGraph), list every group of coupled "
                    "channels that can be pruned together and every op that blocks pruning. Prunes nothing.",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    p.add_argument("--model", required=True,
                   help="a built-in model name (e.g. digits-cnn) or torchvision:NAME (random weights)")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="shape of the example input (default: the built-in model's, 1,3,64,64 for torchvision)")
    p.add_argument("--ignore", nargs="*", default=[], metavar="MODULE",
                   help="modules whose output channels are never pruned (names as in named_modules)")
    p.add_argument("--verbose", action="store_true", help="list every slice of every group")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=run)


def _shape(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise ConfigError(f"analyze: --input-shape must be comma-separated integers like 1,3,64,64, "
                          f"got {text!r}") from e
    if not shape or min(shape) < 1:
        raise ConfigError(f"analyze: --input-shape needs positive sizes, got {text!r}")
    return shape


def load_model(spec: str, input_shape: str | None) -> tuple[Any, tuple[Any, ...]]:
    """(model, example inputs) for a built-in name or ``torchvision:NAME``."""

    if spec.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError as e:
            raise ConfigError("analyze: torchvision models need `pip install torchvision`") from e
        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise ConfigError(f"analyze: unknown torchvision model {name!r}; see torchvision.models.list_models()")
        model = torchvision.models.get_model(name, weights=None)
        return model.eval(), (_example(_shape(input_shape, (1, 3, 64, 64))),)
    from ..models import build_model, registered_models

    if spec not in registered_models():
        raise ConfigError(f"analyze: unknown model {spec!r}; built-in: {registered_models()}, "
                          f"or torchvision:NAME")
    model = build_model(spec).eval()
    return model, (_example(_shape(input_shape, _BUILTIN_SHAPES.get(spec, (1, 1, 28, 28)))),)


def _example(shape: tuple[int, ...]) -> Any:
    """A random input of `shape`, allocated lazily: an expanded batch-1 tensor (no N-fold memory)."""
    import torch

    return torch.rand((1, *shape[1:])).expand(shape)


def check_example(model: Any, x: Any, flag: str = "--input-shape", hint: tuple[int, ...] = (1, 3, 64, 64)) -> None:
    """Refuse an input the model cannot take, or one too large for this machine, with a clear error.

    A batch-1 forward measures the activations per sample; the full batch needs about N times that.
    """
    import os

    import torch

    from ..calib.data import _expects, describe_batch
    from ..errors import CalibrationError

    n = int(x.shape[0])
    one = x[:1]
    acts = [0]

    def count(_m: Any, _i: Any, out: Any) -> None:
        acts[0] += sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple | list) else [out])
                       if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(one)
    except Exception as e:  # noqa: BLE001 - the model cannot take this shape: say which and why
        raise CalibrationError(f"{flag} {','.join(map(str, x.shape))}: the model's forward fails on an input of "
                               f"shape {describe_batch(((one,), {}))} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); {_expects(model)}. Pass the "
                               f"shape the model takes, e.g. {flag} {','.join(map(str, hint))}") from e
    finally:
        for h in handles:
            h.remove()
    need = n * (one.numel() * one.element_size() + acts[0])
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    if need > avail // 2:
        raise CalibrationError(f"{flag} {','.join(map(str, x.shape))}: a forward at this batch size needs about "
                               f"{need / 2**30:.1f} GiB (input plus activations, measured at batch 1 x {n}) but "
                               f"{avail / 2**30:.1f} GiB is available; use a smaller batch, e.g. {flag} "
                               f"1,{','.join(map(str, x.shape[1:]))}")


def run(args: argparse.Namespace) -> int:
    """Analyze and print the groups."""
    from ..config import compile_patterns
    from ..graph.analyze import analyze, format_analysis

    model, x = load_model(args.model, args.input_shape)
    compile_patterns(args.ignore, [n for n, _ in model.named_modules() if n], "--ignore")
    check_example(model, x[0], hint=_BUILTIN_SHAPES.get(args.model, (1, 3, 64, 64)))
    x = (x[0].contiguous(),)
    info = analyze(model, x, ignore=tuple(args.ignore))
    if args.format == "json":
        info.pop("report")
        print(json.dumps(info, indent=2))
    else:
        print(format_analysis(info, verbose=args.verbose))
    return 0
