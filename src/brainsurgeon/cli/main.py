"""The ``brainsurgeon`` command: global flags, subcommand dispatch and error reporting.

    $ brainsurgeon env
    $ brainsurgeon demo --dataset digits --out out/demo
    $ brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --out out/c

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``.
A :class:`~brainsurgeon.errors.BrainsurgeonError` or a usage error is printed as ``error: <message>``
on stderr with exit code 2 and no traceback (``--log-level debug`` shows the traceback); any other
exception exits 1 with its traceback logged. With ``--format json`` every failure also prints
``{"error": {"type", "message", "exit_code"}}`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .. import _log
from ..errors import BrainsurgeonError
from . import analyze, bench, compress, demo, distill, env, prune, search

COMMANDS = (compress, prune, search, distill, analyze, bench, demo, env)
LOG_LEVELS = ("debug", "info", "warning", "error")

EPILOG = """examples:
  brainsurgeon env                                   # versions and hardware, for bug reports
  brainsurgeon demo                                  # dense vs pruned vs quantized on real digits
  brainsurgeon compress --model digits-cnn --recipe recipes/digits-obs75-obq4.yaml --out out/c
  brainsurgeon prune --model digits-cnn --ratio 0.5 --importance group_l2 --out out/p
  brainsurgeon search --model digits-cnn --space recipes/search-digits.yaml --budget flops=0.25 --out plan.yaml
  brainsurgeon analyze --help                        # coupled groups and blocked ops of a model
  brainsurgeon compress --help                       # options of one command
"""


class _UsageError(Exception):
    """argparse's complaint (bad flag/value), raised instead of exiting so main() can format it."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(self, message)


def _fail(kind: str, message: str, json_out: bool, rc: int) -> int:
    """Print one error: ``error: ...`` on stderr, and with --format json a JSON object on stdout."""
    print(f"error: {message}", file=sys.stderr)
    if json_out:
        print(json.dumps({"error": {"type": kind, "message": message, "exit_code": rc}}))
    return rc


def _add_global_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The flags accepted before and after the subcommand name.

    On subcommands their default is SUPPRESS so they never overwrite a value given earlier.
    """
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", default=d(False),
                   help="hide progress bars (also hidden when the environment has CI=true)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=d("warning"),
                   help="verbosity of the log on stderr (default: warning)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests).

    >>> build_parser().parse_args(["env", "--format", "json"]).format
    'json'
    """
    parser = _Parser(
        prog="brainsurgeon", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress trained PyTorch models (OBS pruning/quantization, structural pruning, low-rank, "
                    "weight sharing, distillation, budget search) and measure it.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"brainsurgeon {__version__}")
    _add_global_flags(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, defaults=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub, parents=[common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage/brainsurgeon error).

    >>> main(["env", "--format", "json"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    json_out = any(a == "--format=json" or (a == "--format" and nxt == "json")
                   for a, nxt in zip(argv, argv[1:] + [""], strict=True))
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        if not json_out:
            e.parser.print_usage(sys.stderr)
        return _fail("UsageError", f"{e.parser.prog}: {e}", json_out, 2)
    json_out = getattr(args, "format", None) == "json"
    show_progress = not args.no_progress and os.environ.get("CI", "").lower() not in ("true", "1")
    prev_progress = _log.progress_enabled()
    logger = logging.getLogger("brainsurgeon")
    prev_level = logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    _log.set_progress(show_progress)
    try:
        return int(args.func(args))
    except BrainsurgeonError as e:
        if args.log_level == "debug":
            logger.exception("traceback")
        return _fail(type(e).__name__, str(e), json_out, 2)
    except KeyboardInterrupt:
        return _fail("KeyboardInterrupt", "interrupted", json_out, 130)
    except Exception as e:  # noqa: BLE001 - a bug or the user's own code: keep the traceback, say where
        logger.exception("unexpected error in `brainsurgeon %s`", args.command)
        return _fail(type(e).__name__, f"unexpected {type(e).__name__} in `brainsurgeon {args.command}`: {e} "
                     f"(the traceback is above; please report it with `brainsurgeon env`)", json_out, 1)
    finally:
        _log.set_progress(prev_progress)
        logger.removeHandler(handler)
        logger.setLevel(prev_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
