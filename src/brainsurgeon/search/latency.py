"""Measured latency of layer variants on this machine: a lookup table cached per machine fingerprint.

Each variant runs as the module that would really execute it: a dense copy of the layer with
the compressed weights, or, for a sparse ``nn.Linear`` at density <= 1/2, a CSR matrix product
(``torch.sparse``), the one real sparse CPU kernel in PyTorch. Quantized weights without a
packed kernel run as float; the table records which kernel ran, so no speed-up is invented.

    >>> table = LatencyTable("db/")                  # db/latency-<fingerprint>.json
    >>> table.measure("fc1|sp@0.9", module, W_hat, variant, input_shape=(1, 512))
    1.9e-05
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_open
from .variants import Variant


def machine_fingerprint(device: torch.device | str = "cpu") -> str:
    """A short hash of CPU model, core count, torch version and device: latencies are only reused on a match.

    >>> len(machine_fingerprint())
    12
    """
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    text = f"{platform.machine()}|{cpu}|{os.cpu_count()}|{torch.__version__}|{dev.type}|{gpu}|threads=1"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with W stored as a CSR sparse matrix (a real sparse kernel on CPU)."""

    def __init__(self, linear: nn.Linear, W: torch.Tensor) -> None:
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta" on every call
            warnings.simplefilter("ignore", UserWarning)
            self.weight = W.detach().to_sparse_csr()  # (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).t()  # (..., in) -> (in, n)
        y = torch.sparse.mm(self.weight, x2).t()  # (n, out)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def runtime_module(module: nn.Module, W_hat: torch.Tensor, variant: Variant) -> tuple[nn.Module, str]:
    """The module that executes `variant` and the name of its kernel ("dense", "csr", "lowrank", "separable").

    >>> runtime_module(nn.Linear(64, 8), torch.zeros(8, 64), Variant("sp@0.95", (), 0.95))[1]
    'csr'
    """
    if variant.pattern == "lowrank":
        from .factored import factorized_module

        return factorized_module(module, W_hat, variant.configs[0].rank), "lowrank"
    if variant.pattern == "separable":
        from .factored import separable_module

        return separable_module(module, W_hat, variant.configs[0]), "separable"  # type: ignore[arg-type]
    density = float((W_hat != 0).float().mean())
    if isinstance(module, nn.Linear) and density <= 0.5:
        return CSRLinear(module, W_hat.reshape(module.weight.shape)), "csr"
    m = copy.deepcopy(module)
    with torch.no_grad():
        m.weight.copy_(W_hat.reshape(m.weight.shape))
    return m, "dense"


def time_module(module: nn.Module, x: torch.Tensor, repeats: int = 15, inner: int = 0) -> float:
    """Median seconds of one forward over `repeats` timings, with one torch thread (restored after).

    `inner` forwards per timing (0: enough for about 1 ms) smooth out timer resolution.

    >>> time_module(nn.Linear(64, 8), torch.randn(1, 64))
    4.1e-06
    """
    threads = torch.get_num_threads()
    cuda = x.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            module(x)
            sync()
            if not inner:
                t0 = time.perf_counter()
                module(x)
                sync()
                inner = max(1, min(1000, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    module(x)
                sync()
                times.append((time.perf_counter() - t0) / inner)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


class LatencyTable:
    """Latency (seconds, batch of one) per key, stored in ``<folder>/latency-<fingerprint>.json``.

    >>> t = LatencyTable("db/")
    >>> t.get("fc1|dense")          # None until measured on this machine
    """

    def __init__(self, folder: str | os.PathLike[str], device: torch.device | str = "cpu") -> None:
        self.fingerprint = machine_fingerprint(device)
        self.path = Path(folder) / f"latency-{self.fingerprint}.json"
        self.rows: dict[str, dict[str, float | str]] = {}
        if self.path.is_file():
            self.rows = json.loads(self.path.read_text(encoding="utf-8")).get("rows", {})

    def get(self, key: str) -> float | None:
        row = self.rows.get(key)
        return None if row is None else float(row["seconds"])

    def measure(self, key: str, module: nn.Module, W_hat: torch.Tensor, variant: Variant,
                input_shape: tuple[int, ...], repeats: int = 15) -> float:
        """The cached latency of `key`, or time the variant's runtime module now and store it."""
        if (hit := self.get(key)) is not None:
            return hit
        m, kernel = runtime_module(module, W_hat, variant)
        x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(
            device=module.weight.device, dtype=module.weight.dtype)
        sec = time_module(m, x, repeats)
        self.rows[key] = {"seconds": sec, "kernel": kernel}
        with atomic_open(self.path, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "rows": self.rows}, f, indent=1)
        return sec
