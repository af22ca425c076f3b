"""Model-output damage against the dense model, with one layer swapped in or of any model.

``metric="kl"``: mean KL(p_dense || p) of the output softmax over the samples; ``"mse"``: the
relative distortion sum ||y - y_dense||^2 / sum ||y_dense||^2 (OBC's per-layer model loss).
When the layer sits in a plain ``nn.Sequential`` (MobileNet's ``features``), the children before
it are replayed from cached dense activations, so one layer costs only the rest of the model.

    >>> dmg = OutputDamage(model, calib, metric="kl")
    >>> dmg.layer_damage("features.3.conv.1.0", W_hat), dmg.model_damage(other_model)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calib import cache_batches, move_to
from ..calib.data import model_device
from ..calib.forwards import _forward
from ..errors import ConfigError
from ..graph.trace import in_mode
from .solve import layer_weight, set_layer_weight_

METRICS = ("kl", "mse")


def output_of(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's output tensor for one (args, kwargs) batch (first element / ``.logits``), float64."""
    y = _forward(model, batch)[1]
    y = y[0] if isinstance(y, (tuple, list)) else getattr(y, "logits", y)
    return y.detach().double()


def damage_of(y: torch.Tensor, ref: torch.Tensor, metric: str) -> float:
    """Summed damage of outputs `y` against the dense `ref` (kl: summed over samples; mse: squared error).

    >>> damage_of(torch.zeros(2, 3), torch.zeros(2, 3), "kl")
    0.0
    """
    if metric == "kl":
        return float(F.kl_div(y.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"))
    return float(((y - ref) ** 2).sum())


class _Replay(nn.Module):
    """Stands in for the children of a Sequential before the layer: returns the cached activation."""

    def __init__(self) -> None:
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, *args: Any) -> torch.Tensor:
        assert self.out is not None
        return self.out


def _sequential_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """(path of the outermost plain nn.Sequential on `name`'s path, index of the child holding it)."""
    parts = name.split(".")
    mod = model
    for i, p in enumerate(parts[:-1]):
        mod = getattr(mod, p)
        if type(mod).forward is nn.Sequential.forward and isinstance(mod, nn.Sequential):
            return ".".join(parts[: i + 1]), int(parts[i + 1]) if parts[i + 1].isdigit() else -1
    return None


class OutputDamage:
    """Damage of a private copy of `model` against its own dense outputs on `batches`.

    ``layer_damage(name, W_hat)``: with only layer `name` set to W_hat; ``model_damage(m)``: of
    any model; both normalised (kl: mean per sample; mse: by sum ||y_dense||^2).
    """

    def __init__(self, model: nn.Module, calib: Any, metric: str = "kl") -> None:
        if metric not in METRICS:
            raise ConfigError(f"OutputDamage: metric {metric!r} is not one of {list(METRICS)}")
        self.metric = metric
        self.model = copy.deepcopy(model).eval()
        self.modules = dict(self.model.named_modules())
        dev = model_device(self.model)
        self.batches = [move_to(b, dev) for b in cache_batches(calib)]
        with torch.no_grad():
            self.dense = [output_of(self.model, b) for b in self.batches]
        self.norm = (sum(d.shape[0] for d in self.dense) if metric == "kl"
                     else max(sum(float((d**2).sum()) for d in self.dense), 1e-300))
        self._acts: dict[tuple[str, int], list[torch.Tensor]] = {}

    def model_damage(self, model: nn.Module) -> float:
        with in_mode(model, "eval", keep_buffers=False), torch.no_grad():   # train/eval flags restored
            total = sum(damage_of(output_of(model, b), d, self.metric)
                        for b, d in zip(self.batches, self.dense, strict=True))
        return total / self.norm

    def _inputs(self, seq: str, k: int) -> list[torch.Tensor]:
        """Dense input of child k of Sequential `seq`, per batch (computed from child k - 1's)."""
        if (seq, k) not in self._acts:
            s = self.modules[seq]
            if k == 0:
                got: list[torch.Tensor] = []
                h = s.register_forward_pre_hook(lambda m, a: got.append(a[0]))
                try:
                    with torch.no_grad():
                        for b in self.batches:
                            _forward(self.model, b)
                finally:
                    h.remove()
                self._acts = {key: v for key, v in self._acts.items() if key[0] != seq}
            else:
                with torch.no_grad():
                    got = [s[k - 1](x) for x in self._inputs(seq, k - 1)]
                self._acts.pop((seq, k - 1), None)  # walked in order: keep one level
            self._acts[(seq, k)] = got
        return self._acts[(seq, k)]

    def layer_damage(self, name: str, W_hat: torch.Tensor, quant_in: nn.Module | None = None) -> float:
        """Damage with layer `name` set to W_hat (and its input passed through `quant_in`, if given)."""
        mod = self.modules[name]
        W0 = layer_weight(mod).clone()
        where = _sequential_of(self.model, name)
        hook = None if quant_in is None else mod.register_forward_pre_hook(lambda m, a: (quant_in(a[0]), *a[1:]))
        try:
            set_layer_weight_(mod, W_hat.to(W0.device))
            if where is None or where[1] <= 0:
                return self.model_damage(self.model)
            seq, k = where
            s = self.modules[seq]
            xs, kept, replay = self._inputs(seq, k), list(s[:k]), _Replay()
            try:  # children 0..k-1 become: identity ... identity, replay(cached input of child k)
                for i in range(k):
                    s[i] = replay if i == k - 1 else nn.Identity()
                total = 0.0
                with torch.no_grad():
                    for b, x, d in zip(self.batches, xs, self.dense, strict=True):
                        replay.out = x
                        total += damage_of(output_of(self.model, b), d, self.metric)
            finally:
                for i, c in enumerate(kept):
                    s[i] = c
            return total / self.norm
        finally:
            set_layer_weight_(mod, W0)
            if hook is not None:
                hook.remove()
