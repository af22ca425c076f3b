"""Re-calibration after compression: BatchNorm statistics and per-channel mean/std correction.

    >>> n_bn = reestimate_batchnorm_(model, loader, max_batches=32)     # OBC "batchnorm tuning"
    >>> shifts = correct_mean_std_(model, dense, ["conv1", "fc"], loader)  # {'conv1': 0.013, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger, progress
from .._modes import eval_mode
from ..errors import CalibrationError
from .data import Batch, cache_batches, is_one_shot, iter_batches, model_device, move_to
from .forwards import _forward, _StopForward
from .hessian import resolve_layers, set_weight_matrix_, weight_matrix
from .order import execution_order

log = get_logger(__name__)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def reestimate_batchnorm_(model: nn.Module, calib: Any, max_batches: int = 0) -> int:
    """Recompute every BatchNorm's running statistics on `calib`; returns how many were updated.

    Running stats are reset and re-accumulated as a cumulative average (``momentum=None``)
    with only the BatchNorm layers in train mode (dropout stays off), under ``no_grad``.
    Momentum and train/eval modes are restored afterwards; on error the old statistics too.

    >>> reestimate_batchnorm_(resnet, loader, max_batches=50)
    53
    """
    bns = _batchnorms(model)
    if not bns:
        log.debug("no BatchNorm layer with running statistics; nothing to re-estimate")
        return 0
    saved = [(m, m.momentum, {k: b.clone() for k, b in m._buffers.items() if b is not None}) for m in bns]
    dev = model_device(model)
    done = False
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        with eval_mode(model), torch.no_grad():  # every flag back on exit, the BNs' train() below included
            for m in bns:
                m.train()
            for args, kwargs in progress(iter_batches(calib, max_batches), desc="batchnorm"):
                model(*move_to(args, dev), **move_to(kwargs, dev))
        done = True
    finally:
        for m, momentum, bufs in saved:
            m.momentum = momentum
            if not done:
                for k, b in bufs.items():
                    m._buffers[k].copy_(b)
    log.info("re-estimated %d BatchNorm layer(s)", len(bns))
    return len(bns)


class _ChannelStats:
    """Per-output-channel running sums of a layer's output (float64)."""

    def __init__(self, module: nn.Module) -> None:
        self.conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        self.n = 0
        self.s: torch.Tensor | float = 0.0
        self.ss: torch.Tensor | float = 0.0

    def add(self, y: torch.Tensor) -> None:
        if self.conv and y.dim() > 2:
            y = y.movedim(1, -1)  # (N, C, *S) -> (N, *S, C)
        y = y.detach().reshape(-1, y.shape[-1]).double()  # (n, C)
        self.s = self.s + y.sum(0)
        self.ss = self.ss + (y * y).sum(0)
        self.n += y.shape[0]

    def mean_std(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0:
            raise CalibrationError(f"layer {name!r} was never reached by the calibration data; "
                                   f"pass ignore=[{name!r}] to skip its correction")
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0.0)
        return mean, var.sqrt()


def _output_stats(root: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Batch],
                  stop: bool) -> dict[str, _ChannelStats]:
    stats = {name: _ChannelStats(mod) for name, mod in layers.items()}
    handles = []

    def make_hook(st: _ChannelStats) -> Any:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            st.add(out[0] if isinstance(out, (tuple, list)) else out)
            if stop:
                raise _StopForward
        return hook

    try:
        for name, mod in layers.items():
            handles.append(mod.register_forward_hook(make_hook(stats[name])))
        for batch in batches:
            _forward(root, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


STD_MODES = ("match", "none")


def _correct_layer_(module: nn.Module, mean_c: torch.Tensor, std_c: torch.Tensor,
                    mean_d: torch.Tensor, std_d: torch.Tensor, std: str = "match") -> None:
    """Scale rows by s = std_d/std_c (clamped to [0.5, 2]; 1 for std='none') and set the bias so the means match."""
    W = weight_matrix(module)
    s = torch.ones_like(std_c)
    if std == "match":
        s = torch.where(std_c > 1e-12, std_d / std_c.clamp_min(1e-12), s).clamp(0.5, 2.0)
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(W.shape[0], dtype=W.dtype, device=W.device))
    bias = module.bias
    b_old = bias.detach().double().to(mean_c.device)
    b_new = mean_d - s * (mean_c - b_old)  # new mean: s * (mean_c - b_old) + b_new = mean_d
    set_weight_matrix_(module, W.double() * s.to(W.device)[:, None])
    with torch.no_grad():
        bias.copy_(b_new.to(dtype=bias.dtype, device=bias.device))


def correct_mean_std_(model: nn.Module, dense_model: nn.Module, names: list[str], calib: Any,
                      max_batches: int = 0, std: str = "match") -> dict[str, float]:
    """Match each compressed layer's per-channel output mean/std to the dense model's, in place.

    For each named layer in execution order (so each correction sees its corrected
    predecessors), the output statistics of `model` and `dense_model` on the same calibration
    inputs give ``s = std_dense / std_comp`` (clamped to [0.5, 2]); weight rows are scaled by
    s and the bias (created if missing) is set so the channel means match. Channels are dim 1
    for convs and the last dim for linear layers. Returns ``{name: mean |mean_dense - mean_comp|}``
    measured before the correction. ``std='none'`` corrects the means only (s = 1).

    Meant for pruned models (their outputs lose gain). On activation-quantized models it hurts:
    matching each layer to the dense model's outputs compensates errors that arrive from upstream
    before ReLU/ReLU6 (whose clipping would absorb much of them), and std matching reads the
    quantization noise as a gain error and shrinks the signal by std_d / std_c at every layer. On
    MobileNetV2 W8A8 (bench/act_diag.py) agreement falls from 85.5 % to 72.7 % (means only) even
    when fitted on the evaluation crops themselves; use :func:`correct_bias_` there.

    >>> shifts = correct_mean_std_(model, dense, ["features.0", "classifier"], loader)
    """
    if std not in STD_MODES:
        raise ValueError(f"correct_mean_std_: std must be one of {list(STD_MODES)}, got {std!r}")
    layers = resolve_layers(model, names)
    dense_layers = resolve_layers(dense_model, names)
    if not layers:
        return {}
    if is_one_shot(calib):
        calib = cache_batches(calib, max_batches)
    dev, dense_dev = model_device(model), model_device(dense_model)
    shifts: dict[str, float] = {}
    with eval_mode(model, dense_model), torch.no_grad():
        dense_batches = (move_to(b, dense_dev) for b in iter_batches(calib, max_batches))
        dense_stats = _output_stats(dense_model, dense_layers, dense_batches, stop=False)

        def batches() -> Iterable[Batch]:
            return (move_to(b, dev) for b in iter_batches(calib, max_batches))

        groups, repeated = execution_order(model, layers, batches)
        for name in progress([n for g in groups for n in g], desc="mean/std correction"):
            stats = _output_stats(model, {name: layers[name]}, batches(), stop=name not in repeated)
            mean_c, std_c = stats[name].mean_std(name)
            mean_d, std_d = (t.to(mean_c.device) for t in dense_stats[name].mean_std(name))
            if mean_c.shape != mean_d.shape:
                raise CalibrationError(f"layer {name!r} has {mean_c.numel()} output channels in the "
                                       f"compressed model but {mean_d.numel()} in the dense one; "
                                       f"mean/std correction needs the same layer shapes")
            shifts[name] = float((mean_d - mean_c).abs().mean())
            _correct_layer_(layers[name], mean_c, std_c, mean_d, std_d, std)
    log.info("mean/std correction of %d layer(s)", len(shifts))
    return shifts


def correct_bias_(model: nn.Module, dense_model: nn.Module, names: list[str], calib: Any,
                  max_batches: int = 0) -> dict[str, float]:
    """Empirical bias correction (Nagel et al., ICCV 2019, sec. 4.2): remove each layer's *own* mean error.

    On the inputs x each named layer receives in `model` (before its input quantizer), the mean
    per output channel of layer_c(x) - layer_d(x) (compressed layer vs the dense model's layer of the
    same name, same input) is subtracted from the bias (created if missing). Errors that arrive from
    upstream are left to the layers that caused them: matching the dense model's output means
    instead (``correct_mean_std_``) compensates propagated errors before ReLU/ReLU6, where the
    clipping would have absorbed much of them. MobileNetV2 W8A8 RTN + mse (bench/act_diag.py, 256
    crops): 85.5 % agreement uncorrected, 87.9 % / 85.5 % after this correction on 64 / 128 crops,
    72.7 % after ``correct_mean_std_(std='none')``. One pass over `calib`; returns
    ``{name: mean |correction|}``.

    >>> shifts = correct_bias_(model, dense, ["features.0.0", "classifier.1"], loader)
    """
    layers = resolve_layers(model, names)
    dense_layers = resolve_layers(dense_model, names)
    if not layers:
        return {}
    dev = model_device(model)
    stats = {n: _ChannelStats(m) for n, m in layers.items()}  # of layer_c(x) - layer_d(x)
    handles = []

    def make_hooks(name: str) -> tuple[Any, Any]:
        seen: list[torch.Tensor] = []

        def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(args[0])  # the raw input, before the input quantizer's pre-hook

        def post(m: nn.Module, args: Any, out: Any) -> None:
            x = seen.pop()
            ref = dense_layers[name](x.to(next(dense_layers[name].parameters()).device))
            stats[name].add(out - ref.to(out.device))
        return pre, post

    try:
        for n, m in layers.items():
            pre, post = make_hooks(n)
            handles += [m.register_forward_pre_hook(pre, prepend=True), m.register_forward_hook(post)]
        with eval_mode(model, dense_model), torch.no_grad():
            for batch in iter_batches(calib, max_batches):
                _forward(model, move_to(batch, dev))
            shifts: dict[str, float] = {}
            for n, m in layers.items():
                err, _ = stats[n].mean_std(n)  # per output channel
                shifts[n] = float(err.abs().mean())
                if getattr(m, "bias", None) is None:
                    m.bias = nn.Parameter(torch.zeros(err.numel(), dtype=m.weight.dtype, device=m.weight.device))
                m.bias.sub_(err.to(dtype=m.bias.dtype, device=m.bias.device))
    finally:
        for h in handles:
            h.remove()
    log.info("bias correction of %d layer(s)", len(shifts))
    return shifts
