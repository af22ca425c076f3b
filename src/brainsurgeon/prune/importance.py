"""Channel importance criteria: a registry of short functions ``(group, stats, cfg) -> scores[n]``.

A higher score means more important; the pruner removes the lowest. A criterion that does
not apply to a group (e.g. ``bn_scale`` on a group without a norm layer) returns ``None``
and the group is left unpruned (named in the report's notes).

    >>> from brainsurgeon.prune import score, registered_importances
    >>> registered_importances()
    ['apoz', 'bn_scale', 'group_l1', 'group_l2', 'hessian', 'l1', 'l2', 'lamp', 'obd', 'obs', 'random', 'taylor']
    >>> s = score("group_l2", group, Stats(model), ChannelPruning())     # tensor of shape (group.n,)

Every criterion reads the model only through the group's slices (module name, tensor, dim,
idxs); the data-driven ones read what :mod:`brainsurgeon.prune.stats` collected (``needs``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

ScoreFn = Callable[[Any, "Stats", Any], "torch.Tensor | None"]


@dataclass
class Stats:
    """What the data-driven criteria read, collected once per pruning step.

    grads/fisher: ``"module.tensor"`` -> mean gradient / mean squared gradient over batches;
    hessians: consumer module name -> layer-input Hessian ``H = 2 X X^T / n`` (cols, cols);
    apoz: consumer module name -> fraction of zero inputs per input channel (C,);
    notes: what the calibration feed added or left out (``calib.mixed``), for the caller's report.
    """

    model: nn.Module
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    apoz: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Importance:
    """A registered criterion: its function and the statistics it needs."""

    name: str
    fn: ScoreFn
    needs: tuple[str, ...]


_IMPORTANCE: dict[str, Importance] = {}
_NEEDS = ("grads", "fisher", "hessians", "apoz")


def register_importance(name: str, needs: tuple[str, ...] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register ``fn(group, stats, cfg) -> Tensor[n] | None`` under `name`.

    >>> @register_importance("my_l3")
    ... def my_l3(group, stats, cfg):
    ...     return slice_values(stats.model, group.root).abs().pow(3).sum(1)
    """
    bad = [n for n in needs if n not in _NEEDS]
    if bad:
        raise ConfigError(f"importance {name!r}: unknown needs {bad}; allowed: {list(_NEEDS)}")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in _IMPORTANCE:
            raise ConfigError(f"importance {name!r} is already registered; pick another name")
        _IMPORTANCE[name] = Importance(name, fn, tuple(needs))
        return fn

    return deco


def registered_importances() -> list[str]:
    """Names accepted by ``ChannelPruning(importance=...)``."""
    return sorted(_IMPORTANCE)


def importance_needs(name: str) -> tuple[str, ...]:
    """The statistics a criterion needs (empty: data-free)."""
    return _lookup(name).needs


def _lookup(name: str) -> Importance:
    if name not in _IMPORTANCE:
        raise ConfigError(f"unknown importance {name!r}; registered: {registered_importances()}")
    return _IMPORTANCE[name]


def score(name: str, group: Any, stats: Stats, cfg: Any) -> torch.Tensor | None:
    """Scores (n,) of the group's logical channels under criterion `name`, float32 (or None).

    >>> score("l1", group, Stats(model), cfg).shape == (group.n,)
    True
    """
    s = _lookup(name).fn(group, stats, cfg)
    if s is None:
        return None
    if s.shape != (group.n,) or not torch.isfinite(s).all():
        raise ConfigError(f"importance {name!r} returned scores of shape {tuple(s.shape)} (want ({group.n},)) "
                          f"or non-finite values for the group rooted at {group.root.module!r}")
    return s.detach().float()


# ----------------------------------------------------------------------------- slice helpers


def slice_tensor(model: nn.Module, s: Any, modules: dict[str, nn.Module] | None = None) -> torch.Tensor:
    """The parameter/buffer a slice refers to: ``getattr(model.get_submodule(module), tensor)``; ``modules``:
    the graph's ``{name: module}`` of this model, where the name is looked up first (``get_submodule`` walks
    the dotted path attribute by attribute, ~10 us a call)."""
    m = modules.get(s.module) if modules is not None else None
    return getattr(m if m is not None else model.get_submodule(s.module), s.tensor)


def _graph_modules(group: Any, model: nn.Module) -> dict[str, nn.Module] | None:
    """The ``{name: module}`` of the group's graph when it was built on ``model`` (else None)."""
    graph = getattr(group, "graph", None)
    return getattr(graph, "_modules", None) if getattr(graph, "model", None) is model else None


def is_param(model: nn.Module, s: Any) -> bool:
    """Whether a slice is on a parameter (weights, biases, norm affine), not a running statistic."""
    return isinstance(slice_tensor(model, s), nn.Parameter)


def gather(t: torch.Tensor, s: Any) -> torch.Tensor:
    """The slice's entries of `t` (a tensor shaped like the slice's tensor) as (n, k * rest)."""
    x = t.detach().movedim(s.dim, 0)  # (D, *rest)
    x = x[s.idxs.to(x.device).reshape(-1)]  # (n * k, *rest)
    return x.reshape(s.idxs.shape[0], -1)  # (n, k * prod(rest))


def slice_values(model: nn.Module, s: Any) -> torch.Tensor:
    """The slice's values as (n, k * rest) float32 on the tensor's device."""
    return gather(slice_tensor(model, s), s).float()


def channel_norms(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """sum of |t|^p over every dim but ``dim``: (t.shape[dim],). Output channels (contiguous rows) take
    one fused ``vector_norm``; any other dim is reduced in chunks of ~64k entries, ~5x faster than one
    pow + sum over a large weight (which allocates a temporary as big as the weight).

    >>> channel_norms(torch.ones(4, 3, 2), 1, 2)
    tensor([8., 8., 8.])
    """
    d, b = t.shape[dim], math.prod(t.shape[dim + 1:])
    x = t.detach().float()
    if math.prod(t.shape[:dim]) == 1 and d * b:   # A = 1: the (D, B) slab itself (no (1, D, B) view to index)
        return torch.linalg.vector_norm(x.reshape(d, b), p, dim=1).pow(p)
    x = x.reshape(-1, d, b)  # (A, D, B)
    step = max(1, (1 << 16) // (d * b or 1))
    if step >= x.shape[0]:   # one chunk: its sum is what adding it to zeros gives (the sums are >= 0, never -0.0)
        return (x.square() if p == 2 else x.abs().pow(p)).sum((0, 2))
    out = torch.zeros(d, device=x.device)
    for i in range(0, x.shape[0], step):
        part = x[i:i + step]
        out += (part.square() if p == 2 else part.abs().pow(p)).sum((0, 2))
    return out


def slice_norms(model: nn.Module, s: Any, p: float, t: torch.Tensor | None = None) -> torch.Tensor:
    """sum over each logical channel's entries of |w|^p, (n,) float32: :func:`channel_norms` of the whole
    tensor (no copy of the slice), then a gather of the channel's ``k`` indices.

    >>> torch.allclose(slice_norms(model, s, 2), slice_values(model, s).pow(2).sum(1))
    True
    """
    per = channel_norms(slice_tensor(model, s) if t is None else t, s.dim, p)  # (D,); t: the tensor, looked up
    idx = s.idxs.to(per.device)   # (n, k)
    if idx.shape[1] == 1:   # one index per channel: the gather is the sum (a one-term sum of x >= 0 is x)
        return per.index_select(0, idx.reshape(-1))
    return per.index_select(0, idx.reshape(-1)).reshape(idx.shape).sum(1)  # (n * k,) -> (n, k) -> (n,)


def _param_slices(group: Any, model: nn.Module) -> list[Any]:
    return [s for s, _ in _param_tensors(group, model)]


def _param_tensors(group: Any, model: nn.Module) -> list[tuple[Any, torch.Tensor]]:
    """``(slice, tensor)`` of the group's slices on floating-point parameters (one module lookup each)."""
    out = []
    mods = _graph_modules(group, model)
    for s in group.slices:
        t = slice_tensor(model, s, mods)
        if isinstance(t, nn.Parameter) and torch.is_floating_point(t):
            out.append((s, t))
    return out


def _reduce(per_slice: list[torch.Tensor], how: str) -> torch.Tensor:
    st = torch.stack([p.to(per_slice[0].device) for p in per_slice])  # (slices, n)
    if how == "sum":
        return st.sum(0)
    if how == "mean":
        return st.mean(0)
    return st.max(0).values  # "max"


def normalize(s: torch.Tensor, how: str) -> torch.Tensor:
    """Scale a group's scores so that groups compare in a global ranking (DepGraph's options)."""
    if how == "mean":
        return s / s.mean().clamp_min(1e-12)
    if how == "max":
        return s / s.max().clamp_min(1e-12)
    if how == "sum":
        return s / s.sum().clamp_min(1e-12)
    if how == "standardize":
        return (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)
    return s


# ----------------------------------------------------------------------------- data-free criteria


@register_importance("l1")
def l1(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """||w_c||_1 of the root slice only (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017)."""
    return slice_norms(stats.model, group.root, 1)


@register_importance("l2")
def l2(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """||w_c||_2 of the root slice only (magnitude pruning with the L2 norm)."""
    return slice_norms(stats.model, group.root, 2).sqrt()


def _group_norm(group: Any, stats: Stats, cfg: Any, p: int) -> torch.Tensor:
    """DepGraph group norm (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023, eq. 5):

    I_c = (sum over coupled parameter slices s of ||w_{s,c}||_p^p)^(1/p), reduced across
    slices by ``cfg.reduce`` (``root`` = the root slice only), then ``cfg.normalize``.
    """
    slices = _param_tensors(group, stats.model)
    if cfg.reduce == "root" or not slices:
        slices = [(group.root, slice_tensor(stats.model, group.root, _graph_modules(group, stats.model)))]
    per = [slice_norms(stats.model, s, p, t) for s, t in slices]  # each (n,)
    red = _reduce(per, "sum" if cfg.reduce == "root" else cfg.reduce)
    return normalize(red.pow(1.0 / p), cfg.normalize)


@register_importance("group_l1")
def group_l1(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """Group L1 norm over every coupled parameter slice (DepGraph, CVPR 2023)."""
    return _group_norm(group, stats, cfg, 1)


@register_importance("group_l2")
def group_l2(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """Group L2 norm over every coupled parameter slice (DepGraph, CVPR 2023)."""
    return _group_norm(group, stats, cfg, 2)


@register_importance("bn_scale")
def bn_scale(group: Any, stats: Stats, cfg: Any) -> torch.Tensor | None:
    """|gamma_c| of the group's norm layers (Liu et al., "Learning Efficient Convolutional Networks
    through Network Slimming", ICCV 2017); None when the group has no affine norm layer."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    per = [slice_norms(stats.model, s, 1) for s in group.slices
           if s.tensor == "weight" and isinstance(stats.model.get_submodule(s.module), norms)]
    return _reduce(per, "sum") if per else None


@register_importance("random")
def random_scores(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """Uniform random scores, deterministic given ``cfg.seed`` and the group's root (a baseline)."""
    key = f"{group.root.module}.{group.root.tensor}:{group.root.dim}".encode()
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + zlib.crc32(key))
    return torch.rand(group.n, generator=gen)


@register_importance("lamp")
def lamp(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """LAMP (Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", ICLR 2021, eq. 2)
    on channel group norms v_c = ||w_c||^2: score_c = v_c / sum_{d: v_d >= v_c} v_d."""
    per = [slice_norms(stats.model, s, 2) for s in _param_slices(group, stats.model) or [group.root]]
    v = _reduce(per, "sum")  # (n,)
    order = torch.argsort(v)  # ascending
    tail = v[order].flip(0).cumsum(0).flip(0)  # tail[i] = sum of v[order[i:]]
    out = torch.empty_like(v)
    out[order] = v[order] / tail.clamp_min(1e-30)
    return out


# ----------------------------------------------------------------------------- data-driven criteria


def _key(s: Any) -> str:
    return f"{s.module}.{s.tensor}" if s.module else s.tensor


@register_importance("taylor", needs=("grads",))
def taylor(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """First-order Taylor (Molchanov et al., "Importance Estimation for Neural Network Pruning",
    CVPR 2019, eq. 8): I_c = (sum over the channel's coupled parameters of g_s w_s)^2."""
    per = [(gather(stats.grads[_key(s)], s).float() * slice_values(stats.model, s)).sum(1)
           for s in _param_slices(group, stats.model) if _key(s) in stats.grads]
    if not per:
        return torch.zeros(group.n)
    return _reduce(per, "sum").pow(2)


@register_importance("obd", needs=("fisher",))
def obd(group: Any, stats: Stats, cfg: Any) -> torch.Tensor:
    """Optimal Brain Damage (LeCun et al., NIPS 1990): 1/2 sum_s h_ss w_s^2 over the channel's coupled
    parameters, with the diagonal Hessian approximated by the empirical Fisher E[g^2]."""
    per = [(gather(stats.fisher[_key(s)], s).float() * slice_values(stats.model, s).pow(2)).sum(1) / 2
           for s in _param_slices(group, stats.model) if _key(s) in stats.fisher]
    if not per:
        return torch.zeros(group.n)
    return _reduce(per, "sum")


def consumer_columns(module: nn.Module, s: Any) -> torch.Tensor | None:
    """Weight-matrix columns (n, k * kernel) fed by an 'in' slice of a Linear/Conv consumer, or None.

    Conv columns are ordered (in_channel, kh, kw) like ``weight.reshape(out, -1)``.
    """
    if s.tensor != "weight" or s.role != "in":
        return None
    if isinstance(module, nn.Linear) and s.dim == 1:
        return s.idxs.cpu()  # (n, k)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and s.dim == 1:
        kk = int(module.weight[0, 0].numel())
        cols = s.idxs.cpu().unsqueeze(-1) * kk + torch.arange(kk)  # (n, k, kk)
        return cols.reshape(s.idxs.shape[0], -1)
    return None


def consumers(group: Any, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(module name, columns (n, m)) of every Linear/Conv layer that reads the group's channels."""
    out = []
    for s in group.slices:
        cols = consumer_columns(model.get_submodule(s.module), s)
        if cols is not None:
            out.append((s.module, cols))
    return out


def obs_saliency(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor, damp: float) -> torch.Tensor:
    """Structured OBS saliency of removing each column set, with the rest re-solved optimally.

    Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon", NIPS 1992,
    extended to a block of weights per row (Kurtic et al., "The Optimal BERT Surgeon", 2022, eq. 3):
    L_c = 1/2 sum_rows w_{r,C} [(H^{-1})_{CC}]^{-1} w_{r,C}^T.   W: (rows, cols); H: (cols, cols);
    cols: (n, m) column indices per channel. Returns (n,).

    >>> obs_saliency(fc2.weight, H, torch.arange(64).unsqueeze(1), damp=0.01)   # one column per channel
    """
    H = H.double()
    Hd = H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Q = torch.cholesky_inverse(torch.linalg.cholesky(Hd))  # (cols, cols) = H^-1
    cols = cols.to(H.device)
    Qcc = Q[cols.unsqueeze(-1), cols.unsqueeze(-2)]  # (n, m, m)
    Wc = W.double().to(H.device)[:, cols].permute(1, 0, 2)  # (rows, n, m) -> (n, rows, m)
    sol = torch.linalg.solve(Qcc.unsqueeze(1), Wc.unsqueeze(-1)).squeeze(-1)  # (n, rows, m) = Qcc^-1 w
    return 0.5 * (Wc * sol).sum((1, 2))  # (n,)


@register_importance("hessian", needs=("hessians",))
def hessian(group: Any, stats: Stats, cfg: Any) -> torch.Tensor | None:
    """OBD at the consumers (LeCun et al., NIPS 1990) with the layer-wise Hessian H = 2 X X^T / n
    (Frantar & Alistarh 2022, eq. 1): 1/2 sum_{j in cols(c)} H_jj ||W_{:,j}||^2 summed over consumers."""
    per = []
    for name, cols in consumers(group, stats.model):
        if name in stats.hessians:
            W = stats.model.get_submodule(name).weight.detach()
            Wm = W.reshape(W.shape[0], -1).double()  # (rows, cols)
            d = stats.hessians[name].diagonal().to(Wm.device)  # (cols,)
            per.append(0.5 * (d * Wm.pow(2).sum(0))[cols.to(Wm.device)].sum(1))  # (n, m) -> (n,)
    return _reduce(per, "sum") if per else None


@register_importance("obs", needs=("hessians",))
def obs(group: Any, stats: Stats, cfg: Any) -> torch.Tensor | None:
    """Structured OBS at the consumers: the layer-output loss of removing the channel after the
    consumer's remaining inputs are re-solved (:func:`obs_saliency`), summed over consumers."""
    per = []
    for name, cols in consumers(group, stats.model):
        if name in stats.hessians:
            W = stats.model.get_submodule(name).weight.detach()
            per.append(obs_saliency(W.reshape(W.shape[0], -1), stats.hessians[name], cols, cfg.damp))
    return _reduce(per, "sum") if per else None


@register_importance("apoz", needs=("apoz",))
def apoz(group: Any, stats: Stats, cfg: Any) -> torch.Tensor | None:
    """1 - APoZ (Hu et al., "Network Trimming", 2016): the fraction of non-zero activations a channel
    feeds its consumers (a channel that is always zero after its ReLU scores 0)."""
    per = []
    for s in group.slices:
        mod = stats.model.get_submodule(s.module)
        if s.module in stats.apoz and consumer_columns(mod, s) is not None:
            z = stats.apoz[s.module]  # (C_in,)
            per.append(1.0 - z[s.idxs.to(z.device)].float().mean(1))  # (n, k) -> (n,)
    return _reduce(per, "mean") if per else None
