"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, sec. 4.1) of activation ranges through BatchNorm -> activation -> Conv pairs.

For a producer P (a BatchNorm, or a Conv/Linear with no BatchNorm after it) whose output channel j
reaches a consumer Conv/Linear C only through a positive-homogeneous activation f (ReLU, ReLU6,
Hardtanh, or none), f(u / s) = f_s(u) / s with f_s's clip bounds divided by s per channel, so::

    P' = P / s  (per output channel: BN gamma, beta; or conv rows, bias),   f' = f with bounds / s,
    C' = C diag(s)   (every weight reading input channel j multiplied by s_j)

computes the same function in float, while the consumer's input channel j now spans a_j / s_j.
The scales follow SmoothQuant's form (Xiao et al. 2023, eq. 4) on the calibration ranges
a_j = max |x_j| of the consumer's input and w_j = max |C[:, j]|::

    s_j = a_j^alpha / w_j^(1 - alpha)        (a depthwise consumer: s_j = a_j)

A depthwise consumer (one input channel per output channel) quantizes each column with its own
per-channel weight scale, so its weights are indifferent to s and the activation range is flattened
completely (every channel spans [0, 1]); elsewhere alpha trades activation range against the
consumer's per-output-channel weight range. Dead channels (a_j = 0) are left alone. ReLU6 /
Hardtanh become :class:`ChannelClamp` (the same clip, one bound per channel) so the float model is
unchanged; each fold is checked against the float output and undone if anything else reads the
scaled tensor (a residual add).

    >>> pairs = equalize_(mobilenet, calib, alpha=0.5)    # then insert_act_quant_ / W8A8
    >>> pairs["features.1.conv.0.1"]
    'features.1.conv.1'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..errors import ConfigError
from ..formats import register_module_format
from .smooth import output_probe

log = get_logger(__name__)

_PRODUCERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Conv1d, nn.Conv2d, nn.Linear)
_CONSUMERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@register_module_format("channel_clamp")
class ChannelClamp(nn.Module):
    """``clamp(x, lo_c, hi_c)`` with one pair of bounds per channel (dim 1): a ReLU6/Hardtanh whose
    channels cross-layer equalization rescaled."""

    def __init__(self, channels: int, lo: float = 0.0, hi: float = 6.0) -> None:
        super().__init__()
        self.register_buffer("lo", torch.full((channels,), float(lo)))
        self.register_buffer("hi", torch.full((channels,), float(hi)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2) if x.dim() > 1 else (-1,)
        return torch.clamp(x, self.lo.view(view).to(x.dtype), self.hi.view(view).to(x.dtype))

    def spec(self) -> dict[str, Any]:
        return {"channels": int(self.lo.numel())}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ChannelClamp:
        return cls(spec["channels"])

    def extra_repr(self) -> str:
        return f"channels={self.lo.numel()}"


def _homogeneous(m: nn.Module) -> bool:
    """f(u / s) = f_s(u) / s for s > 0: ReLU, ReLU6/Hardtanh (bounds rescaled), ChannelClamp."""
    return isinstance(m, (nn.ReLU, nn.Hardtanh, ChannelClamp))


def _is_depthwise(c: nn.Module) -> bool:
    return isinstance(c, (nn.Conv1d, nn.Conv2d)) and c.groups > 1 and c.groups == c.in_channels


@torch.no_grad()
def _observe(model: nn.Module, calib: Any, max_batches: int
             ) -> tuple[dict[str, tuple[str, str]], dict[str, torch.Tensor]]:
    """{consumer: (producer, activation or '')} read off one forward's tensors, and each consumer's
    per-input-channel max |x| over the calibration batches (a Linear's padding tokens left out)."""
    from ..calib.data import eval_forwards
    from ..calib.padding import real_rows

    mods = {n: m for n, m in model.named_modules() if n}
    made: dict[int, tuple[str, str]] = {}  # id(tensor) -> (producer, activation)
    keep: list[torch.Tensor] = []          # keeps the tensors alive so their ids are not reused
    pairs: dict[str, tuple[str, str]] = {}
    amax: dict[str, torch.Tensor] = {}

    def prod_hook(name: str) -> Any:
        def fn(m: nn.Module, a: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor):
                made[id(out)] = (name, "")
                keep.append(out)
        return fn

    def act_hook(name: str) -> Any:
        def fn(m: nn.Module, a: tuple[Any, ...], out: Any) -> None:
            src = made.get(id(a[0])) if a and isinstance(a[0], torch.Tensor) else None
            if src is not None and not src[1] and isinstance(out, torch.Tensor):
                made[id(out)] = (src[0], name)
                keep.append(out)
        return fn

    def cons_hook(name: str) -> Any:
        def fn(m: nn.Module, a: tuple[Any, ...]) -> None:
            x = a[0]
            src = made.get(id(x))
            if src is not None:
                pairs[name] = src
            dim = 1 if x.dim() > 2 and not isinstance(m, nn.Linear) else -1
            x = real_rows(x) if isinstance(m, nn.Linear) else x  # a Linear's padding tokens left out
            cur = x.detach().abs().movedim(dim, 0).reshape(x.shape[dim], -1).amax(dim=1).float()
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return fn

    handles = []
    def next_batch() -> None:
        made.clear()
        keep.clear()

    try:
        for n, m in mods.items():
            if isinstance(m, _PRODUCERS):
                handles.append(m.register_forward_hook(prod_hook(n)))
            if _homogeneous(m):
                handles.append(m.register_forward_hook(act_hook(n)))
            if isinstance(m, _CONSUMERS):
                handles.append(m.register_forward_pre_hook(cons_hook(n), prepend=True))
        eval_forwards(model, calib, max_batches, each=next_batch)
    finally:
        for h in handles:
            h.remove()
    # a Conv followed by a BatchNorm is not the producer: the BN is (its output is what the act reads)
    return pairs, amax


def equalization_scales(a: torch.Tensor, consumer: nn.Module, alpha: float) -> torch.Tensor:
    """s_j = a_j^alpha / w_j^(1 - alpha) (depthwise consumer: a_j); 1 where a_j = 0 (dead channel)."""
    a = a.float()
    if _is_depthwise(consumer):
        s = a.clone()
    else:
        W = consumer.weight.detach().float()
        cols = W.shape[1] if W.dim() == 2 else W.shape[1] * consumer.groups  # type: ignore[union-attr]
        per_in = W.transpose(0, 1) if W.dim() == 2 else _by_input_channel(W, consumer.groups)  # type: ignore[arg-type]
        w = per_in.reshape(cols, -1).abs().amax(dim=1)
        s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1 - alpha)
    dead = a <= 0
    s[dead] = 1.0
    live = s[~dead]
    if live.numel():  # keep the largest channel's scale at 1 (the overall scale is arbitrary)
        s[~dead] = live / live.max()
    return s


def _by_input_channel(W: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in/g, *k) as (in, out/g, *k): the weights reading each input channel."""
    out, ipg = W.shape[:2]
    Wg = W.reshape(groups, out // groups, ipg, *W.shape[2:])      # (g, og, ipg, *k)
    return Wg.transpose(1, 2).reshape(groups * ipg, out // groups, *W.shape[2:])


def _scale_inputs_(c: nn.Module, s: torch.Tensor) -> None:
    """C' = C diag(s): every weight reading input channel j times s_j."""
    W = c.weight
    if W.dim() == 2:
        W.mul_(s.to(W)[None, :])
        return
    g = c.groups  # type: ignore[union-attr]
    out, ipg = W.shape[:2]
    Wg = W.view(g, out // g, ipg, *W.shape[2:])
    Wg.mul_(s.to(W).view(g, 1, ipg, *([1] * (W.dim() - 2))))


def _scale_outputs_(p: nn.Module, s: torch.Tensor) -> None:
    """P' = P / s per output channel (BatchNorm: gamma, beta; Conv/Linear: weight rows, bias)."""
    w = p.weight
    w.div_(s.to(w).view(-1, *([1] * (w.dim() - 1))))
    if p.bias is not None:
        p.bias.div_(s.to(p.bias))


def _clamp_of(act: nn.Module, channels: int) -> nn.Module:
    """The activation with per-channel bounds (ReLU stays ReLU: it has no bound to rescale)."""
    if isinstance(act, (nn.ReLU, ChannelClamp)):
        return act
    assert isinstance(act, nn.Hardtanh)
    return ChannelClamp(channels, act.min_val, act.max_val)


@torch.no_grad()
def equalize_(model: nn.Module, calib: Any, alpha: float = 0.5, names: Iterable[str] | None = None,
              max_batches: int = 0, tol: float = 1e-4) -> dict[str, str]:
    """Fold cross-layer equalization scales into every (producer -> activation -> consumer) pair, in place.

    names: the consumer layers that may be equalized (default: all). Returns {producer: consumer} of
    the folded pairs. The float model computes the same function afterwards (checked on the first
    calibration batch to relative `tol`; a fold that changes it is undone).

    >>> equalize_(model, calib)            # then bs.compress(model, bs.W8A8(), calib)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"equalize_: alpha (migration strength) must be in [0, 1], got {alpha!r}; e.g. 0.5")
    pairs, amax = _observe(model, calib, max_batches)
    allowed = None if names is None else set(names)
    out = output_probe(model, calib)
    done: dict[str, str] = {}
    undone: list[str] = []
    with eval_mode(model):
        ref = out()
        for cname, (pname, aname) in pairs.items():
            if allowed is not None and cname not in allowed:
                continue
            p, c = model.get_submodule(pname), model.get_submodule(cname)
            n = p.weight.shape[0] if p.weight is not None else 0
            cin = c.weight.shape[1] * (c.groups if hasattr(c, "groups") else 1)  # type: ignore[operator]
            if p.weight is None or n != cin or n != amax[cname].numel():
                continue
            s = equalization_scales(amax[cname], c, alpha).to(p.weight.device)
            saved = [t.detach().clone() for t in (p.weight, p.bias, c.weight) if t is not None]
            act = model.get_submodule(aname) if aname else None
            new_act = None if act is None else _clamp_of(act, n)
            if isinstance(new_act, ChannelClamp):
                if new_act is not act:
                    new_act = new_act.to(p.weight.device)
                    model.set_submodule(aname, new_act)
                old_bounds = (new_act.lo.clone(), new_act.hi.clone())
                new_act.lo.div_(s.to(new_act.lo))
                new_act.hi.div_(s.to(new_act.hi))
            _scale_outputs_(p, s)
            _scale_inputs_(c, s)
            y = out()
            if float((y - ref).norm() / ref.norm().clamp_min(1e-30)) > tol:  # the scaled tensor feeds more
                for t, v in zip([t for t in (p.weight, p.bias, c.weight) if t is not None], saved, strict=True):
                    t.copy_(v)
                if isinstance(new_act, ChannelClamp):
                    if new_act is not act:
                        model.set_submodule(aname, act)  # type: ignore[arg-type]
                    else:
                        new_act.lo.copy_(old_bounds[0])
                        new_act.hi.copy_(old_bounds[1])
                undone.append(cname)
                continue
            done[pname] = cname
    if undone:
        log.info("equalize_: %d pair(s) left as they are: the scaled tensor also feeds other consumers: %s",
                 len(undone), undone)
    log.info("cross-layer equalization (alpha %.2f): %d producer -> consumer pairs folded", alpha, len(done))
    return done
