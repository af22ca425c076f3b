"""A benchmark script of bench/ loaded as a module, so a test drives the bench's own per-model code path."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@contextmanager
def bench_module(script: str) -> Iterator[ModuleType]:
    """bench/<script> as a module (bench/ importable for its own helpers), on 1 torch thread while in use:
    with 2 OpenMP threads on a busy 2-core machine the workers spin and each model costs 10x the CPU."""
    spec = importlib.util.spec_from_file_location(f"{pathlib.Path(script).stem}_bench", BENCH / script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(mod)
        torch.set_num_threads(1)
        yield mod
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))
