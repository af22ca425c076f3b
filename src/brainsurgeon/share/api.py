"""The verb ``share_``: Deep Compression weight sharing in place, optionally fine-tuned and saved.

    >>> rep = share_(model, WeightSharing(bits=4))                          # k-means per layer
    >>> rep = share_(model, WeightSharing(bits=5, finetune_steps=300), data=train_loader,
    ...              path="out/model.bsdc")                                 # + fine-tune + Huffman file
    >>> rep.metrics["bytes_on_disk"]

The pipeline of the paper is prune -> share -> code: prune first (``sparsify_`` or any mask; zeros
are kept exactly), then ``share_``, then :func:`save_encoded` (or ``path=``), which reports the
size of the real file after a verified round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..calib import supported
from ..config import Config, match_configs
from ..errors import ConfigError, UnsupportedModuleError
from ..report import CompressionReport, LayerRow
from .codec import save_encoded
from .config import WeightSharing
from .finetune import finetune_centroids
from .kmeans import Codebook, cluster_weight

log = get_logger(__name__)


def plan_sharing(model: nn.Module, cfg: Config, ignore: Iterable[str] = (),
                 overrides: Any = ()) -> dict[str, WeightSharing]:
    """Layer name -> WeightSharing for every Linear / Conv / HF Conv1D not ignored (first override wins).

    >>> plan_sharing(model, WeightSharing(bits=4), overrides={"fc2": WeightSharing(bits=8)})
    """
    if not isinstance(cfg, WeightSharing):
        raise ConfigError(f"share_ needs a WeightSharing config, e.g. WeightSharing(bits=4); got {cfg!r}")
    over = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    for pat, c in over:
        if not isinstance(c, WeightSharing):
            raise ConfigError(f"override {pat!r}: share_ overrides must be WeightSharing configs, got {c!r}")
    names = [n for n, m in model.named_modules() if n and supported(m)]
    plan: dict[str, WeightSharing] = match_configs(names, cfg, ignore, over,  # type: ignore[assignment]
                                                   known=[n for n, _ in model.named_modules() if n])
    if not plan:
        raise ConfigError(f"no Linear/Conv layer is left to share in {type(model).__name__} after "
                          f"ignore={list(ignore)}; loosen ignore")
    modules = dict(model.named_modules())
    for name in plan:
        w = modules[name].weight
        if not torch.is_floating_point(w) or w.device.type == "meta":
            raise UnsupportedModuleError(f"layer {name}: weight {w.dtype} on {w.device} cannot be clustered; "
                                         f"pass ignore=['{name}']")
    return plan


def share_(model: nn.Module, cfg: Config, data: Any = None, *, ignore: Iterable[str] = (),
           overrides: Any = (), loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
           path: str | None = None) -> CompressionReport:
    """Replace every layer's weights in place by 2^bits shared values (k-means; zeros stay zero).

    data + ``cfg.finetune_steps > 0``: fine-tune the centroids with gradient sharing (see
    :func:`finetune_centroids`; per-layer overrides must then agree on finetune_steps and lr).
    path: also write the Huffman-coded file there and record its real size
    (``metrics["bytes_on_disk"]``, ``metrics["dense_bytes"]``). On failure the weights are restored.

    >>> rep = share_(model, WeightSharing(bits=4), overrides={r"fc\\d": WeightSharing(bits=2)})
    """
    plan = plan_sharing(model, cfg, ignore, overrides)
    modules = dict(model.named_modules())
    steps = max(c.finetune_steps for c in plan.values())
    if len({(c.finetune_steps, c.lr) for c in plan.values()}) > 1:
        raise ConfigError("share_: centroid fine-tuning trains all layers together, so every override must use "
                          "the same finetune_steps and lr as the main WeightSharing config")
    if steps and data is None:
        raise ConfigError("WeightSharing(finetune_steps > 0) needs data: pass share_(..., data=train_loader) "
                          "or set finetune_steps=0")
    if steps and data is not None:
        from ..calib.data import check_first_batch

        check_first_batch(model, data, "share_")  # a mis-shaped batch fails here, before any change
    saved = {n: modules[n].weight.detach().clone() for n in plan}
    report = CompressionReport()
    try:
        codebooks: dict[str, Codebook] = {}
        seconds: dict[str, float] = {}
        for name, c in plan.items():
            t0 = time.perf_counter()
            codebooks[name] = cluster_weight(modules[name].weight, c.bits, c.init, c.iters)
            seconds[name] = time.perf_counter() - t0
        if steps and data is not None:
            finetune_centroids(model, codebooks, data, steps, next(iter(plan.values())).lr, loss_fn)
            report.notes.append(f"centroids fine-tuned for {steps} steps (gradient sharing)")
        for name, c in plan.items():
            W0, mod = saved[name], modules[name]
            with torch.no_grad():
                mod.weight.copy_(codebooks[name].weight())
            W = mod.weight.detach()
            dW2 = float((W.double() - W0.double()).pow(2).sum())
            report.add_row(LayerRow(
                name=name, method=c.describe(), shape=tuple(W.shape), params=W.numel(),
                nonzeros=int((W != 0).sum()), bits=float(c.bits), loss=dW2,
                rel_loss=dW2 / max(float(W0.double().pow(2).sum()), 1e-300), seconds=seconds[name],
                levels=int(torch.unique(W[W != 0]).numel())))
        if path is not None:
            f = save_encoded(model, path)
            report.add_metric("bytes_on_disk", after=f.bytes_on_disk)
            report.add_metric("dense_bytes", before=f.dense_bytes)
            report.notes.append(f"encoded file {path}: {f.bytes_on_disk} bytes on disk, {f.ratio:.1f}x smaller "
                                f"than the {f.dense_bytes} raw bytes of the state_dict (verified round trip)")
    except BaseException:
        with torch.no_grad():
            for name, W0 in saved.items():
                modules[name].weight.copy_(W0)
        raise
    return report
