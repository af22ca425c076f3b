"""FitNets hints: capture named layers' outputs of student and teacher, map the student's
through a learnable adapter where widths differ, and regress it onto the teacher's.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. A pruned student keeps the
teacher's layer names but has fewer channels; the adapter (a 1x1 conv for (N, C, ...) maps,
a linear layer on the last dim for (N, C) and (N, L, C) features) is initialised by least
squares on one batch, trained with the student, and thrown away afterwards::

    >>> with HintHooks(student, teacher, [("conv2", "conv2")]) as hooks:
    ...     adapters = hooks.build_adapters(lambda: (student(x), teacher(x)))  # sees the widths
    ...     student(x); teacher(x)
    ...     loss = hooks.loss()                   # MSE(adapter(student conv2), teacher conv2)
    >>> # hooks are removed on exit; the student and teacher carry no trace
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .losses import hint_loss


def _feature(out: Any) -> torch.Tensor:
    """The tensor of a module output (first element of a tuple, ``last_hidden_state``...)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise ConfigError(f"hint layer output of type {type(out).__name__} is not a tensor; "
                      f"pick a layer whose output is a tensor")


def channel_dim(fs: torch.Tensor, ft: torch.Tensor, name: str) -> int:
    """The channel dim an adapter maps: 1 for conv maps (N, C, H, W) and (N, C, L), else -1.

    Every other dim must match between student feature `fs` and teacher feature `ft`.
    """
    if fs.dim() != ft.dim():
        raise ConfigError(f"hint {name}: student feature {tuple(fs.shape)} and teacher feature "
                          f"{tuple(ft.shape)} have different ranks; pair layers of the same kind")
    diff = [d for d in range(fs.dim()) if fs.shape[d] != ft.shape[d]]
    dim = 1 if fs.dim() == 4 or (fs.dim() == 3 and diff == [1]) else -1
    if diff and diff != [dim % fs.dim()]:
        raise ConfigError(f"hint {name}: student {tuple(fs.shape)} and teacher {tuple(ft.shape)} differ in "
                          f"dims {diff}; an adapter maps only the channel dim (1x1 conv / linear). "
                          f"Pick layers with equal batch, spatial and sequence sizes")
    return dim


class ChannelAdapter(nn.Module):
    """A learnable linear map of one channel dim (Cs -> Ct): a 1x1 conv when dim = 1.

    >>> ChannelAdapter(12, 16, dim=1)(torch.randn(2, 12, 7, 7)).shape
    torch.Size([2, 16, 7, 7])
    """

    def __init__(self, c_in: int, c_out: int, dim: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(c_in, c_out, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == -1:
            return self.proj(x)
        return self.proj(x.movedim(1, -1)).movedim(-1, 1)  # (N, C, ...) -> (N, ..., C) -> back

    @torch.no_grad()
    def fit_(self, fs: torch.Tensor, ft: torch.Tensor, ridge: float = 1e-3) -> None:
        """Least-squares init: min ||[fs, 1] A - ft||^2 + ridge ||A||^2 over one batch."""
        X = fs.movedim(self.dim, -1).reshape(-1, fs.shape[self.dim]).double()  # (rows, Cs)
        Y = ft.movedim(self.dim, -1).reshape(-1, ft.shape[self.dim]).double()  # (rows, Ct)
        X1 = torch.cat([X, torch.ones_like(X[:, :1])], dim=1)  # (rows, Cs + 1)
        G = X1.T @ X1 + ridge * X1.shape[0] * torch.eye(X1.shape[1], dtype=X1.dtype, device=X1.device)
        A = torch.linalg.solve(G, X1.T @ Y)  # (Cs + 1, Ct)
        self.proj.weight.copy_(A[:-1].T)
        self.proj.bias.copy_(A[-1])


class HintHooks:
    """Forward hooks on paired student/teacher layers plus their adapters (a context manager).

    pairs: (student layer name, teacher layer name). After a student and a teacher forward,
    :meth:`loss` is the mean hint loss over the pairs. Hooks are removed on exit.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
        self.student, self.teacher, self.pairs = student, teacher, list(pairs)
        self.adapters = nn.ModuleDict()
        self._s: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        for s_name, t_name in self.pairs:
            for model, name, who in ((student, s_name, "student"), (teacher, t_name, "teacher")):
                try:
                    model.get_submodule(name)
                except AttributeError as e:
                    names = [n for n, _ in model.named_modules() if n][:20]
                    raise ConfigError(f"hint layer {name!r} not found in the {who} "
                                      f"({type(model).__name__}); some of its layers: {names}") from e

    def _key(self, i: int) -> str:
        return f"hint{i}"

    def __enter__(self) -> HintHooks:
        def store(d: dict[str, torch.Tensor], key: str, detach: bool) -> Callable[..., None]:
            def fn(_m: nn.Module, _args: Any, out: Any) -> None:
                f = _feature(out)
                d[key] = f.detach() if detach else f
            return fn

        try:
            for i, (s_name, t_name) in enumerate(self.pairs):
                k = self._key(i)
                self._handles.append(self.student.get_submodule(s_name).register_forward_hook(store(self._s, k, False)))
                self._handles.append(self.teacher.get_submodule(t_name).register_forward_hook(store(self._t, k, True)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._s.clear()
        self._t.clear()

    @torch.no_grad()
    def build_adapters(self, run_both: Callable[[], Any]) -> nn.ModuleDict:
        """Run `run_both` (a student and a teacher forward), then create one adapter per pair:
        identity where the features already match, else a least-squares-initialised map."""
        run_both()
        for i, (s_name, t_name) in enumerate(self.pairs):
            k = self._key(i)
            if k not in self._s or k not in self._t:
                raise ConfigError(f"hint ({s_name!r}, {t_name!r}) was not reached by the forward pass; "
                                  f"pick layers that run in the model's forward")
            fs, ft = self._s[k], self._t[k]
            dim = channel_dim(fs, ft, f"({s_name!r}, {t_name!r})")
            if fs.shape == ft.shape:
                self.adapters[k] = nn.Identity()
                continue
            ad = ChannelAdapter(fs.shape[dim], ft.shape[dim], dim, device=fs.device, dtype=fs.dtype)
            ad.fit_(fs, ft)
            self.adapters[k] = ad
        self._s.clear()
        self._t.clear()
        return self.adapters

    def loss(self) -> torch.Tensor:
        """Mean over the pairs of the hint loss of the last student/teacher forwards."""
        losses = []
        for i in range(len(self.pairs)):
            k = self._key(i)
            fs, ft = self._s.pop(k), self._t.pop(k)
            losses.append(hint_loss(self.adapters[k](fs), ft.to(fs.device)))
        return torch.stack(losses).mean()
