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
    modes = {m: m.training for m in model.modules()}
    dev = model_device(model)
    done = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for args, kwargs in progress(iter_batches(calib, max_batches), desc="batchnorm"):
                model(*move_to(args, dev), **move_to(kwargs, dev))
        done = True
    finally:
        for m, momentum, bufs in saved:
            m.momentum = momentum
            if not done:
                for k, b in bufs.items():
                    m._buffers[k].copy_(b)
        for m, mode in modes.items():
            m.training = mode
    log.info("re-estimated %d BatchNorm layer(s)", len(bns))
    return len(bns)


STD_MODES = ("gain", "match", "none")


class _PairStats:
    """Per-output-channel running moments of a layer's output in the compressed (c) and dense (d) model
    on the same inputs: sums of c, d, c^2, d^2 and c*d (float64)."""

    def __init__(self, module: nn.Module) -> None:
        self.conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        self.n = 0
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(("c", "d", "cc", "dd", "cd"), 0.0)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        if self.conv and y.dim() > 2:
            y = y.movedim(1, -1)  # (N, C, *S) -> (N, *S, C)
        return y.detach().reshape(-1, y.shape[-1]).double()  # (n, C)

    def add(self, yc: torch.Tensor, yd: torch.Tensor) -> None:
        c, d = self._rows(yc), self._rows(yd).to(yc.device)
        for k, v in (("c", c), ("d", d), ("cc", c * c), ("dd", d * d), ("cd", c * d)):
            self.sums[k] = self.sums[k] + v.sum(0)
        self.n += c.shape[0]

    def moments(self, name: str) -> dict[str, torch.Tensor]:
        """Means ``mc``, ``md``, variances ``vc``, ``vd`` and covariance ``cov`` per channel."""
        if self.n == 0:
            raise CalibrationError(f"layer {name!r} was never reached by the calibration data; "
                                   f"pass ignore=[{name!r}] to skip its correction")
        m = {k: v / self.n for k, v in self.sums.items()}  # type: ignore[operator]
        return {"mc": m["c"], "md": m["d"], "vc": (m["cc"] - m["c"] ** 2).clamp_min(0.0),
                "vd": (m["dd"] - m["d"] ** 2).clamp_min(0.0), "cov": m["cd"] - m["c"] * m["d"]}


def _layer_outputs(root: nn.Module, layer: nn.Module, batch: Batch, stop: bool) -> list[torch.Tensor]:
    """Every output of `layer` in one forward of `root` on `batch` (ended after the first when `stop`)."""
    outs: list[torch.Tensor] = []

    def hook(m: nn.Module, args: Any, out: Any) -> None:
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        if stop:
            raise _StopForward

    h = layer.register_forward_hook(hook)
    try:
        _forward(root, batch)
    finally:
        h.remove()
    return outs


def _pair_stats(name: str, model: nn.Module, layer: nn.Module, dense_model: nn.Module, dense_layer: nn.Module,
                pairs: Iterable[tuple[Batch, Batch]], stop: bool) -> _PairStats:
    """Moments of `layer`'s outputs paired with `dense_layer`'s on the same calibration batches."""
    st = _PairStats(layer)
    for batch, dense_batch in pairs:
        yc, yd = _layer_outputs(model, layer, batch, stop), _layer_outputs(dense_model, dense_layer, dense_batch, stop)
        if len(yc) != len(yd):
            raise CalibrationError(f"layer {name!r} ran {len(yc)} time(s) in the compressed model but {len(yd)} in "
                                   f"the dense one on the same batch; mean/std correction needs the same forward")
        for c, d in zip(yc, yd, strict=True):
            if c.shape != d.shape:
                raise CalibrationError(f"layer {name!r} has output shape {tuple(c.shape)} in the compressed model "
                                       f"but {tuple(d.shape)} in the dense one; mean/std correction needs the same "
                                       f"layer shapes")
            st.add(c, d)
    return st


def _gain(mo: dict[str, torch.Tensor], std: str) -> torch.Tensor:
    """Per-channel factor s for the rows of W (clamped to [0.5, 2]; 1 where it is undefined).

    ``match``: s = std_d / std_c (OBC's statistics correction: total variances equal). Quantization
    noise e independent of the signal inflates var_c = g^2 var_d + var_e, so matching shrinks the
    signal by g / sqrt(g^2 + var_e / var_d) at every layer and the shrinkage compounds with depth.
    ``gain``: s = 1 / g with g = cov(c, d) / var_d, the least-squares slope of c on d: removes a
    systematic gain error (pruning's attenuation) and leaves independent noise alone (s = 1).
    ``none``: s = 1 (mean only: empirical bias correction, Nagel et al. 2019).
    """
    one = torch.ones_like(mo["mc"])
    if std == "none":
        return one
    if std == "match":
        ok = mo["vc"] > 1e-24
        s = (mo["vd"] / mo["vc"].clamp_min(1e-24)).sqrt()
    else:
        ok = (mo["vd"] > 1e-24) & (mo["cov"] > 1e-12 * mo["vd"])
        s = mo["vd"] / mo["cov"].clamp_min(1e-24)
    return torch.where(ok, s, one).clamp(0.5, 2.0)


def _correct_layer_(module: nn.Module, mo: dict[str, torch.Tensor], s: torch.Tensor) -> None:
    """Scale rows of W by s and set the bias so the channel means match: s (mean_c - b_old) + b_new = mean_d."""
    W = weight_matrix(module)
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(W.shape[0], dtype=W.dtype, device=W.device))
    bias = module.bias
    b_old = bias.detach().double().to(mo["mc"].device)
    b_new = mo["md"] - s * (mo["mc"] - b_old)
    set_weight_matrix_(module, W.double() * s.to(W.device)[:, None])
    with torch.no_grad():
        bias.copy_(b_new.to(dtype=bias.dtype, device=bias.device))


def correct_mean_std_(model: nn.Module, dense_model: nn.Module, names: list[str], calib: Any,
                      max_batches: int = 0, std: str = "gain") -> dict[str, float]:
    """Correct each compressed layer's per-channel output mean (and gain) toward the dense model's, in place.

    For each named layer in execution order (so each correction sees its corrected predecessors),
    its outputs in `model` and in `dense_model` on the same calibration batches give per channel
    the means m_c, m_d and a factor s (see ``std``, clamped to [0.5, 2]); weight rows are scaled
    by s and the bias (created if missing) is set so the channel means match. Channels are dim 1
    for convs and the last dim for linear layers. Returns ``{name: mean |m_d - m_c|}`` measured
    before the correction.

    std: ``gain`` (default) divides by the least-squares gain of the compressed output on the dense
    one (a systematic scale error; quantization noise is left alone), ``match`` equalises the
    variances (OBC's statistics correction, which also shrinks the signal by the noise share and
    hurts quantized models), ``none`` corrects the mean only (bias correction, Nagel et al. 2019).

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
    modes = {m: m.training for net in (model, dense_model) for m in net.modules()}
    shifts: dict[str, float] = {}
    try:
        model.eval()
        dense_model.eval()
        with torch.no_grad():
            def batches() -> Iterable[Batch]:
                return (move_to(b, dev) for b in iter_batches(calib, max_batches))

            def pairs() -> Iterable[tuple[Batch, Batch]]:
                return ((move_to(b, dev), move_to(b, dense_dev)) for b in iter_batches(calib, max_batches))

            groups, repeated = execution_order(model, layers, batches)
            for name in progress([n for g in groups for n in g], desc="mean/std correction"):
                st = _pair_stats(name, model, layers[name], dense_model, dense_layers[name], pairs(),
                                 stop=name not in repeated)
                mo = st.moments(name)
                shifts[name] = float((mo["md"] - mo["mc"]).abs().mean())
                _correct_layer_(layers[name], mo, _gain(mo, std))
    finally:
        for m, mode in modes.items():
            m.training = mode
    log.info("mean/std correction of %d layer(s) (std=%s)", len(shifts), std)
    return shifts


def correct_bias_(model: nn.Module, dense_model: nn.Module, names: list[str], calib: Any,
                  max_batches: int = 0) -> dict[str, float]:
    """Empirical bias correction (Nagel et al., ICCV 2019, sec. 4.2): remove each layer's *own* mean error.

    On the inputs x each named layer receives in `model` (before its input quantizer), the mean
    per output channel of layer_c(x) - layer_d(x) (compressed layer vs the dense model's layer of the
    same name, same input) is subtracted from the bias (created if missing). Errors that arrive from
    upstream are left to the layers that caused them: matching the dense model's output means
    instead (``correct_mean_std_``) compensates propagated errors before ReLU/ReLU6, where the
    clipping would have absorbed much of them, and on MobileNetV2 W8A8 it halves the agreement
    gained back. One pass over `calib`; returns ``{name: mean |correction|}``.

    >>> shifts = correct_bias_(model, dense, ["features.0.0", "classifier.1"], loader)
    """
    layers = resolve_layers(model, names)
    dense_layers = resolve_layers(dense_model, names)
    if not layers:
        return {}
    dev = model_device(model)
    stats = {n: _PairStats(m) for n, m in layers.items()}
    modes = {m: m.training for net in (model, dense_model) for m in net.modules()}
    handles = []

    def make_hooks(name: str) -> tuple[Any, Any]:
        seen: list[torch.Tensor] = []

        def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(args[0])  # the raw input, before the input quantizer's pre-hook

        def post(m: nn.Module, args: Any, out: Any) -> None:
            x = seen.pop()
            ref = dense_layers[name](x.to(next(dense_layers[name].parameters()).device))
            stats[name].add(out, ref)
        return pre, post

    try:
        model.eval()
        dense_model.eval()
        for n, m in layers.items():
            pre, post = make_hooks(n)
            handles += [m.register_forward_pre_hook(pre, prepend=True), m.register_forward_hook(post)]
        with torch.no_grad():
            for batch in iter_batches(calib, max_batches):
                _forward(model, move_to(batch, dev))
            shifts: dict[str, float] = {}
            for n, m in layers.items():
                mo = stats[n].moments(n)
                shifts[n] = float((mo["md"] - mo["mc"]).abs().mean())
                _correct_layer_(m, mo, torch.ones_like(mo["mc"]))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    log.info("bias correction of %d layer(s)", len(shifts))
    return shifts
