"""Layer inputs as column matrices and the streaming Hessian ``H = 2/n * sum x x^T``.

A layer ``y = W x`` with ``W`` of shape (rows, cols) has the layer-wise OBS loss
``||W X - W' X||^2`` whose Hessian in each row of ``W`` is ``H = 2 X X^T`` (Frantar & Alistarh,
"Optimal Brain Compression", 2022, eq. 1). This module builds ``X^T`` (one row per input
sample/position) for Linear, HF Conv1D, Conv1d and Conv2d layers, in the column order of
:func:`weight_matrix`, and accumulates H in float64::

    >>> with capture_hessians(model, ["fc1", "fc2"]) as hs:
    ...     for x in batches:
    ...         model(x)
    >>> hs["fc1"].H.shape          # (in_features, in_features)

Inside ``calib.regimes.regime_shares`` (the driver's length and vocabulary mix), each kind of input is
accumulated apart and holds a fixed share of H's trace (:mod:`~brainsurgeon.calib.regimes`).

Grouped convolutions (``groups = g > 1``) have one Hessian per group: columns are
(g, n, cols_per_group) and H is (g, cols_per_group, cols_per_group); group ``j`` owns the
weight-matrix rows ``[j * out/g, (j + 1) * out/g)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, ConfigError, UnsupportedModuleError
from .padding import _current_mask
from .regimes import current_regime, is_paused
from .shrinkage import (  # noqa: F401 - auto_shrinkage, shrinkage_intensity re-exported
    HELDOUT_RATIO,
    SPREAD_COLUMNS,
    auto_shrinkage,
    current,
    fold_hessians,
    shrinkage_intensity,
)

_SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d and transformers' Conv1D"


def _is_hf_conv1d(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nx", w.shape[0]) == w.shape[0])


def supported(module: nn.Module) -> bool:
    """Whether the Hessian machinery handles `module` (Linear, Conv1d, Conv2d, HF Conv1D).

    >>> supported(nn.Linear(4, 2)), supported(nn.LayerNorm(4))
    (True, False)
    """
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or _is_hf_conv1d(module)


def _require(module: nn.Module, name: str = "") -> None:
    if not supported(module):
        where = f"layer {name!r} " if name else ""
        raise UnsupportedModuleError(f"{where}of type {type(module).__name__} has no Hessian support; "
                                     f"supported: {_SUPPORTED}. Pass it via ignore=[...] to skip it")


def num_groups(module: nn.Module) -> int:
    """Number of independent Hessians of a layer: ``groups`` of a conv, else 1.

    >>> num_groups(nn.Conv2d(4, 8, 3, groups=2))
    2
    """
    return int(getattr(module, "groups", 1)) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1


def num_columns(module: nn.Module) -> int:
    """Columns of the weight matrix (= size of one Hessian): in/g * kernel for convs.

    >>> num_columns(nn.Conv2d(4, 8, 3, groups=2))
    18
    """
    _require(module)
    if _is_hf_conv1d(module):
        return int(module.weight.shape[0])
    return int(module.weight[0].numel())


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a (rows = outputs, cols = inputs) matrix, detached (may share storage).

    Conv columns are ordered (in_channel, kh, kw) like ``weight.reshape(out, -1)``; HF Conv1D
    (stored as (in, out)) is transposed.

    >>> weight_matrix(nn.Conv2d(3, 8, 3)).shape
    torch.Size([8, 27])
    """
    _require(module)
    w = module.weight.detach()
    if _is_hf_conv1d(module):
        return w.t()  # (in, out) -> (out, in)
    return w.reshape(w.shape[0], -1)  # (out, in/g, *k) -> (out, in/g * prod(k))


def set_weight_matrix_(module: nn.Module, W: torch.Tensor) -> None:
    """Write a (rows, cols) matrix back into the module's weight (inverse of :func:`weight_matrix`).

    >>> set_weight_matrix_(conv, weight_matrix(conv) * 0.5)
    """
    ref = weight_matrix(module)
    if tuple(W.shape) != tuple(ref.shape):
        raise ConfigError(f"{type(module).__name__}: weight matrix must have shape {tuple(ref.shape)}, "
                          f"got {tuple(W.shape)}")
    w = module.weight
    with torch.no_grad():
        if _is_hf_conv1d(module):
            w.copy_(W.t().to(dtype=w.dtype, device=w.device))
        else:
            w.copy_(W.reshape(w.shape).to(dtype=w.dtype, device=w.device))


def layer_columns(module: nn.Module, x: torch.Tensor, name: str = "") -> torch.Tensor:
    """The layer input as ``X^T``: (n, cols) — or (g, n, cols/g-block) for grouped convs.

    Rows are samples (every token / every conv output position); columns follow
    :func:`weight_matrix`, so ``weight_matrix(m) @ cols.T`` reproduces the layer output
    (without bias).

    >>> layer_columns(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 5, 5)).shape
    torch.Size([50, 27])
    """
    _require(module, name)
    cols = num_columns(module)
    where = f"layer {name!r}" if name else type(module).__name__
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        if x.dim() < 1 or x.shape[-1] != cols:
            raise CalibrationError(f"{where} expects inputs with {cols} features in the last dim, got "
                                   f"shape {tuple(x.shape)}; the calibration data does not fit the model")
        return x.reshape(-1, cols)  # (..., in) -> (n, in)
    conv1d = isinstance(module, nn.Conv1d)
    spatial = 1 if conv1d else 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)  # unbatched (C, *S) -> (1, C, *S)
    if x.dim() != spatial + 2 or x.shape[1] != module.in_channels:
        raise CalibrationError(f"{where} expects (N, {module.in_channels}, {'L' if conv1d else 'H, W'}) "
                               f"inputs, got shape {tuple(x.shape)}")
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    k, s, d = module.kernel_size, module.stride, module.dilation
    if conv1d:
        x = x.unsqueeze(2)  # (N, C, L) -> (N, C, 1, L): a 2-D conv of height 1
        k, s, d = (1, k[0]), (1, s[0]), (1, d[0])
    u = F.unfold(x, kernel_size=k, dilation=d, stride=s)  # (N, C*kh*kw, L)
    g = num_groups(module)
    if g == 1:
        return u.transpose(1, 2).reshape(-1, cols)  # (N, cols, L) -> (N*L, cols)
    n, _, L = u.shape
    u = u.reshape(n, g, cols, L)  # channel-major rows: group j owns rows [j*cols, (j+1)*cols)
    return u.permute(1, 0, 3, 2).reshape(g, n * L, cols)  # (g, N*L, cols)


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_i x_i x_i^T`` of one layer's input columns.

    >>> acc = HessianAccumulator("fc1", model.fc1)
    >>> acc.add_input(x)             # the layer's input, any batch shape
    >>> acc.H.shape, acc.n
    (torch.Size([16, 16]), 128)
    """

    def __init__(self, name: str, module: nn.Module, dtype: torch.dtype | str = torch.float64) -> None:
        _require(module, name)
        self.name, self.module = name, module
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.cols, self.groups = num_columns(module), num_groups(module)
        self.n = 0  # rows seen, all regimes
        self.batches = 0
        self._H: torch.Tensor | None = None
        self._rows = 0  # rows in self._H: the running regime's (every row without regime shares)
        # regime shares (calib.regimes): the running regime and its share; the finished regimes' sum of
        # s_r H_r / tr H_r; [sum n_r tr H_r, sum n_r, sum s_r] over them; the regimes seen; regime 0's intensity
        self._regime: int | None = None
        self._share = 0.0
        self._folded: torch.Tensor | None = None
        self._fold_stats = [0.0, 0, 0.0]
        self._seen: set[int] = set()
        self._lam: float | None = None
        ctx = current()
        # auto shrinkage: [samples, sum of their squared off-diagonal H_b entries], else None
        self._spread: list[float] | None = [0, 0.0] if ctx and self.groups == 1 and ctx.wants(name) else None
        # held-out choice: the rows of the odd samples (fold B) while H stays singular, else None
        self._held: list[torch.Tensor] | None = [] if self._spread is not None and ctx.select else None
        self.shrinkage = 0.0  # the intensity applied to H (auto_shrinkage), 0 if none
        self._scale: torch.Tensor | None = None  # column standardisation of the spread statistic
        k = min(self.cols, SPREAD_COLUMNS)
        self._pick = torch.linspace(0, self.cols - 1, k).round().long()  # the columns whose pairs are summed

    def __repr__(self) -> str:
        return f"HessianAccumulator({self.name!r}, cols={self.cols}, groups={self.groups}, n={self.n})"

    def add_input(self, x: torch.Tensor) -> None:
        """Add a raw layer input (what the module's forward receives); nothing while ``regimes.paused()``."""
        if is_paused():
            return
        mask = None if isinstance(self.module, (nn.Conv1d, nn.Conv2d)) else _current_mask(x)
        if mask is not None:  # padded tokens: only the real ones, sample-major (n_real, cols)
            mask = mask.to(x.device)
            x = x.detach()[mask]
        cols = layer_columns(self.module, x.detach(), self.name)
        regime = current_regime()
        if regime is not None and regime[0] != self._regime:
            self._switch(*regime)
        if self._spread is not None and cols.shape[0] and (regime is None or regime[0] == 0):
            if mask is None:
                self._add_spread(x, cols)
            else:
                self._add_spread_ragged(cols.split(mask.sum(1).tolist()))
        self.add(cols)
        if self._held is not None and self._rows >= HELDOUT_RATIO * self.cols:
            self._held = None  # H is (generically) full rank: Schaefer-Strimmer's estimate suffices

    def _add_spread(self, x: torch.Tensor, cols: torch.Tensor) -> None:
        """Per-sample ||H_b||_F^2 off the diagonal, H_b = 2/T X_b^T X_b, one sample = one sequence/image.

        Only the pairs among SPREAD_COLUMNS evenly spaced columns are summed (the intensity is a
        ratio of sums over pairs, so a uniform subset of pairs estimates it; cost ~ T k^2, not T cols^2).
        """
        if isinstance(self.module, (nn.Conv1d, nn.Conv2d)):
            samples = x.shape[0] if x.dim() == (3 if isinstance(self.module, nn.Conv1d) else 4) else 1
        else:
            samples = cols.shape[0] // x.shape[-2] if x.dim() >= 3 else cols.shape[0]
        T = cols.shape[0] // samples
        if self._held is not None:  # samples alternate between the folds in arrival order
            odd = cols.reshape(samples, T, self.cols)[(1 - int(self._spread[0]) % 2)::2]
            self._held.append(odd.reshape(-1, self.cols).to(torch.float32, copy=True))
        Xs = cols.reshape(samples, T, self.cols)[..., self._pick].to(torch.float32)
        if self._scale is None:  # standardise by the first batch's diag: correlations, not covariances
            d = Xs.square().sum((0, 1))
            self._scale = torch.where(d > 0, d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt(), 0.0)
        Xs = Xs * self._scale
        k = len(self._pick)
        step = max(1, 2**24 // (min(T, k) ** 2))  # bounded Gram workspace
        total = 0.0
        for i in range(0, samples, step):
            X = Xs[i:i + step]
            G = X @ X.transpose(1, 2) if T <= k else X.transpose(1, 2) @ X  # ||X^T X||_F = ||X X^T||_F
            d = X.square().sum(1)  # (b, cols): diag of X_b^T X_b
            total += float(G.double().square().sum() - d.double().square().sum())
        self._spread[0] += samples
        self._spread[1] += 4.0 / T**2 * total

    def _add_spread_ragged(self, samples: tuple[torch.Tensor, ...]) -> None:
        """:meth:`_add_spread` for samples of different lengths (padding removed), one sample at a time."""
        samples = tuple(s for s in samples if len(s))
        if not samples:
            return
        if self._held is not None:
            self._held.extend(s.to(torch.float32, copy=True) for s in samples[(1 - int(self._spread[0]) % 2)::2])
        if self._scale is None:
            d = sum(s[:, self._pick].to(torch.float32).square().sum(0) for s in samples)
            self._scale = torch.where(d > 0, d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt(), 0.0)
        total = 0.0
        for s in samples:
            X = s[:, self._pick].to(torch.float32) * self._scale
            G = X @ X.t() if len(X) <= X.shape[1] else X.t() @ X
            d = X.square().sum(0)
            total += 4.0 / len(X) ** 2 * float(G.double().square().sum() - d.double().square().sum())
        self._spread[0] += len(samples)
        self._spread[1] += total

    def add(self, x_cols: torch.Tensor) -> None:
        """Add columns: (b, cols), or (g, b, cols) for a grouped conv."""
        want = (self.cols,) if self.groups == 1 else (self.groups, self.cols)
        got = x_cols.shape[-1:] if self.groups == 1 else x_cols.shape[:1] + x_cols.shape[-1:]
        if x_cols.dim() != len(want) + 1 or tuple(got) != want:
            layout = "(g, n, cols)" if self.groups > 1 else "(n, cols)"
            raise CalibrationError(f"layer {self.name!r}: input columns of shape {tuple(x_cols.shape)} do "
                                   f"not match the layer ({layout} with cols={self.cols}, g={self.groups})")
        b = x_cols.shape[-2]
        self.batches += 1
        if b == 0:
            return
        w = self.module.weight
        device = x_cols.device if w.device.type == "meta" else w.device
        X = x_cols.to(device=device, dtype=self.dtype)  # no copy when it already fits
        if self._H is None:
            shape = (self.cols, self.cols) if self.groups == 1 else (self.groups, self.cols, self.cols)
            self._H = torch.zeros(shape, dtype=self.dtype, device=device)
        n = self._rows + b
        # H <- n_old/n * H + 2/n * X^T X in one GEMM, no scaled copy of X
        if self.groups == 1:
            self._H.addmm_(X.t(), X, beta=self._rows / n, alpha=2.0 / n)
        else:
            self._H.baddbmm_(X.transpose(1, 2), X, beta=self._rows / n, alpha=2.0 / n)
        self._rows = n
        self.n += b
        if not bool(torch.isfinite(self._H.diagonal(dim1=-2, dim2=-1)).all()):  # diag = sums of squares
            self._raise_non_finite(x_cols)

    def _raise_non_finite(self, x_cols: torch.Tensor) -> None:
        if not bool(torch.isfinite(x_cols).all()):
            raise CalibrationError(f"layer {self.name!r} received non-finite activations (NaN or Inf) in "
                                   f"calibration batch {self.batches - 1}; check the data and the layers "
                                   f"before it, run calibration in float32 (fp16 overflow), or pass "
                                   f"ignore=[{self.name!r}]")
        raise CalibrationError(f"layer {self.name!r}: the {self.dtype} Hessian overflowed at calibration "
                               f"batch {self.batches - 1} (inputs up to {float(x_cols.abs().max()):.3g}); use "
                               f"CalibOptions(hessian_dtype='float64') or pass ignore=[{self.name!r}]")

    def _switch(self, regime: int, share: float) -> None:
        """Start regime `regime`'s rows (calib.regimes): fold the running regime's H into the weighted sum."""
        if regime in self._seen or (self._regime is None and self._H is not None):
            raise CalibrationError(f"layer {self.name!r}: calibration regime {regime} came after rows of another "
                                   f"regime or without one; regime shares need the batches regime by regime "
                                   f"(calib.regimes.regime_shares)")
        if self._regime is not None:
            self._fold()
        self._regime, self._share = regime, share
        self._seen.add(regime)

    def _fold(self) -> None:
        """Add ``s_r H_r / tr H_r`` of the running regime to the finished regimes' sum (regime 0: first its
        shrinkage intensity, from its own samples as without shares)."""
        H, self._H = self._H, None
        if H is None:
            return
        if self._spread is not None and self._regime == 0:
            self._lam = self._intensity(H)
            self._spread = self._held = None
        tr = float(H.diagonal(dim1=-2, dim2=-1).sum())
        if tr > 0 and self._share > 0:
            part = H.mul_(self._share / tr)
            self._folded = part if self._folded is None else self._folded.add_(part)
            stats = self._fold_stats
            stats[0], stats[1], stats[2] = stats[0] + self._rows * tr, stats[1] + self._rows, stats[2] + self._share
        elif self._folded is None:
            self._folded = H.zero_()  # no trace (all-zero inputs): no share, but H keeps its shape
        self._rows = 0

    def _intensity(self, H: torch.Tensor) -> float:
        """The shrinkage intensity of H from the samples' spread (auto_shrinkage): Schaefer-Strimmer's, or
        the held-out selector's choice while H is singular."""
        m, sum_sq = self._spread
        held = self._held
        s, pick = self._scale.to(H), self._pick.to(H.device)
        lam = shrinkage_intensity(H[pick[:, None], pick] * s[:, None] * s, int(m), sum_sq)
        ctx = current()
        nB = sum(len(x) for x in held) if held else 0
        if ctx is not None and ctx.select is not None and m >= 2 and 0 < nB < self._rows:
            folds = fold_hessians(H, self._rows, torch.cat(held).to(H.device))
            lam = float(ctx.select(self.name, self.module, folds, lam))
        return lam

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (cols, cols) or (g, cols, cols); raises if the layer was never reached."""
        if self._regime is not None:  # regime shares: the weighted sum, once
            self._fold()
            ntr, n, share = self._fold_stats
            self._H, self._folded, self._regime = self._folded, None, None
            if share > 0:
                self._H.mul_(ntr / n / share)
        if self._H is None:
            raise CalibrationError(f"layer {self.name!r} was never reached by the calibration data; check "
                                   f"that calib feeds the model's forward (and this layer's branch), "
                                   f"or pass ignore=[{self.name!r}]")
        if self._spread is not None and self._scale is not None:  # auto shrinkage, once
            self._lam = self._intensity(self._H)
            self._spread = self._held = None
        if self._lam is not None:
            self.shrinkage, self._lam = self._lam, None
            d = self._H.diagonal().clone()
            self._H.mul_(1.0 - self.shrinkage).diagonal().copy_(d)  # (1 - l) H + l diag(H)
            ctx = current()
            if ctx is not None:
                ctx.applied.append((self.name, self.shrinkage))
        return self._H

    def reset(self) -> None:
        """Forget everything seen so far (frees H)."""
        self._H, self.n, self.batches, self._rows = None, 0, 0, 0
        self._regime, self._folded, self._fold_stats, self._seen, self._lam = None, None, [0.0, 0, 0.0], set(), None
        if self._spread is not None:
            self._spread, self._scale = [0, 0.0], None
            ctx = current()
            self._held = [] if ctx is not None and ctx.select else None


MAX_HESSIAN_BYTES = 4 * 2**30  # one layer's H above this is refused (a conv with 65,536 columns: 17 GB)


def hessian_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Memory of one layer's Hessian(s): groups x cols^2 x itemsize.

    >>> hessian_bytes(nn.Conv2d(128, 64, 8), torch.float64)   # 8,192 columns
    536870912
    """
    return num_groups(module) * num_columns(module) ** 2 * torch.empty(0, dtype=dtype).element_size()


def check_hessian_memory(layers: dict[str, nn.Module], dtype: torch.dtype, resident: bool,
                         limit: int = MAX_HESSIAN_BYTES) -> tuple[torch.dtype, list[str]]:
    """Estimate Hessian memory before any forward: (dtype to use, notes).

    float64 that does not fit falls back to float32 (noted); a layer whose float32 H alone exceeds
    `limit` is refused with a CalibrationError naming it. ``resident``: every H is held at once
    (dense mode), so their sum must fit.
    """
    notes: list[str] = []
    f32 = torch.float32
    big = {n: hessian_bytes(m, f32) for n, m in layers.items() if hessian_bytes(m, f32) > limit}
    if big:
        name, b = max(big.items(), key=lambda kv: kv[1])
        raise CalibrationError(f"layer {name!r}: its Hessian needs {b / 2**30:.1f} GiB even in float32 "
                               f"({num_columns(layers[name]):,} input columns; limit {limit / 2**30:.0f} GiB); "
                               f"pass ignore={sorted(big)} or compress it with a data-free method (RTN, Magnitude)")
    total = sum(hessian_bytes(m, dtype) for m in layers.values()) if resident else 0
    worst = max((hessian_bytes(m, dtype), n) for n, m in layers.items())
    if dtype == torch.float64 and (worst[0] > limit or total > limit):
        notes.append(f"Hessians accumulated in float32, not float64: {worst[1]!r} alone needs "
                     f"{worst[0] / 2**30:.1f} GiB in float64" + (f" ({total / 2**30:.1f} GiB for all, held at once)"
                                                                 if total > limit else ""))
        dtype = f32
    held = sum(hessian_bytes(m, dtype) for m in layers.values()) if resident else 0
    if held > limit:
        notes.append(f"dense mode holds every Hessian at once: {held / 2**30:.1f} GiB; sequential mode holds "
                     f"one layer's at a time")
    return dtype, notes


def resolve_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Map layer names to modules, checking each exists and is supported.

    >>> resolve_layers(model, ["fc1"])
    {'fc1': Linear(in_features=8, out_features=16, bias=True)}
    """
    all_names = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in all_names:
            close = [n for n in all_names if n and (name in n or n in name)][:5]
            hint = f"; similar: {close}" if close else ""
            raise ConfigError(f"no module named {name!r} in {type(model).__name__}{hint}; "
                              f"names are as in model.named_modules()")
        _require(all_names[name], name)
        out[name] = all_names[name]
    return out


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The tensor a layer's forward receives (positional, or the ``input`` keyword).

    >>> first_input((x,), {}) is x
    True
    """
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise CalibrationError(f"a layer was called without a tensor input (keyword arguments: {list(kwargs)}); "
                           f"only layers called as layer(x) can be calibrated")


@contextmanager
def capture_layers(layers: dict[str, nn.Module],
                   dtype: torch.dtype | str = torch.float64) -> Iterator[dict[str, HessianAccumulator]]:
    """Like :func:`capture_hessians` for already-resolved ``{name: module}`` layers.

    >>> with capture_layers({"layers.0.fc": block.fc}) as hs:
    ...     block(h)
    """
    accs = {name: HessianAccumulator(name, mod, dtype) for name, mod in layers.items()}
    handles = []
    try:
        for name, mod in layers.items():
            def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     acc: HessianAccumulator = accs[name]) -> None:
                acc.add_input(first_input(args, kwargs))

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        yield accs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_hessians(model: nn.Module, names: list[str],
                     dtype: torch.dtype | str = torch.float64) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate the Hessian of every named layer during forwards run inside the block.

    Forward pre-hooks are registered on entry and removed on exit, also on error.

    >>> with capture_hessians(model, ["fc1"]) as hs:
    ...     model(x)
    >>> H = hs["fc1"].H
    """
    with capture_layers(resolve_layers(model, names), dtype) as accs:
        yield accs
