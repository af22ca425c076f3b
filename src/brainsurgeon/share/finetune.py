"""Centroid fine-tuning with gradient sharing (Han et al., ICLR 2016, sec. 3.3, fig. 3).

While :func:`sharing_hooks` is active, each shared layer's weight is computed from its codebook,
``W = [c_0 .. c_{k-1}, 0][labels]``; autograd's backward of that gather sums the gradients of all
weights in a cluster into their centroid (``dL/dc_k = sum_{l(i) = k} dL/dW_i``), which is exactly
the paper's gradient sharing, and pruned weights (label k) stay zero. Usable in any training loop::

    >>> with sharing_hooks(model, codebooks) as centroids:        # {name: Codebook}
    ...     opt = torch.optim.Adam(centroids, lr=1e-4)
    ...     for x, y in loader:
    ...         loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    >>> # on exit every layer holds its fine-tuned shared values in its original weight Parameter
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._log import get_logger, progress
from .._modes import eval_mode
from ..calib import iter_batches, move_to
from ..errors import ConfigError
from .kmeans import Codebook

log = get_logger(__name__)


@contextmanager
def sharing_hooks(model: nn.Module, codebooks: dict[str, Codebook]) -> Iterator[list[nn.Parameter]]:
    """Make each named layer's weight a function of trainable centroids; yields the centroid Parameters.

    On exit (also on error) the hooks are removed and each layer's original weight Parameter
    (same object, same requires_grad, same position in the state_dict) receives the shared values.
    """
    layers = {name: model.get_submodule(name) for name in codebooks}
    state: list[tuple[nn.Module, nn.Parameter, list[str], torch.Tensor, nn.Parameter, Any]] = []
    try:
        for name, mod in layers.items():
            p = mod._parameters.get("weight")
            cb = codebooks[name]
            if not isinstance(p, nn.Parameter) or tuple(cb.labels.shape) != tuple(p.shape):
                raise ConfigError(f"sharing_hooks: layer {name!r} has no weight of shape {tuple(cb.labels.shape)}")
            order = list(mod._parameters)
            c = nn.Parameter(cb.centroids.detach().to(device=p.device, dtype=p.dtype).clone())
            labels = cb.labels.to(p.device)

            def shared(m: nn.Module, args: Any, c: nn.Parameter = c, labels: torch.Tensor = labels) -> None:
                m.weight = torch.cat([c, c.new_zeros(1)])[labels]  # (k + 1,) gathered to W's shape

            del mod._parameters["weight"]
            mod.weight = torch.cat([c, c.new_zeros(1)])[labels].detach()
            state.append((mod, p, order, labels, c, mod.register_forward_pre_hook(shared)))
        yield [s[4] for s in state]
    finally:
        for mod, p, order, labels, c, handle in state:
            handle.remove()
            with torch.no_grad():
                p.copy_(torch.cat([c, c.new_zeros(1)])[labels])
            del mod.weight
            params = dict(mod._parameters)
            params["weight"] = p
            mod._parameters.clear()
            mod._parameters.update({k: params[k] for k in order})


def _cross_entropy(output: Any, batch: Any) -> torch.Tensor:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ConfigError("share_: centroid fine-tuning without loss_fn needs (input, label) batches; pass "
                          "loss_fn=lambda output, batch: ... for other data")
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits, batch[1].to(logits.device))


def finetune_centroids(model: nn.Module, codebooks: dict[str, Codebook], data: Any, steps: int,
                       lr: float = 1e-4, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> list[float]:
    """Fine-tune only the centroids for `steps` batches of `data` (cycled) with Adam; returns the losses.

    Runs in eval mode (BatchNorm statistics and dropout untouched); the model's mode and every
    parameter's requires_grad are restored. loss_fn(output, raw batch) defaults to cross-entropy
    on (input, label) batches.

    >>> finetune_centroids(model, codebooks, train_loader, steps=200)
    """
    loss_fn = loss_fn or _cross_entropy
    device = next(model.parameters()).device
    grads = {p: p.requires_grad for p in model.parameters()}
    losses: list[float] = []
    with eval_mode(model):
        try:
            for p in grads:
                p.requires_grad_(False)
            with sharing_hooks(model, codebooks) as centroids:
                opt = torch.optim.Adam(centroids, lr=lr)
                raw = _cycle(data)
                for _ in progress(range(steps), desc="centroids", total=steps):
                    batch = next(raw)
                    (args, kwargs), = iter_batches([batch])
                    out = model(*move_to(args, device), **move_to(kwargs, device))
                    loss = loss_fn(out, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                for name, c in zip(codebooks, centroids, strict=True):
                    codebooks[name] = Codebook(c.detach().clone(), codebooks[name].labels)
        finally:
            for p, g in grads.items():
                p.requires_grad_(g)
    if losses:
        log.info("centroid fine-tuning: loss %.4f -> %.4f over %d steps", losses[0], losses[-1], steps)
    return losses


def _cycle(data: Any) -> Iterator[Any]:
    src = data() if callable(data) and not hasattr(data, "__iter__") else data
    while True:
        seen = False
        for batch in src:
            seen = True
            yield batch
        if not seen:
            raise ConfigError("share_: the fine-tuning data is empty")
        if isinstance(src, Iterator):
            raise ConfigError("share_: the fine-tuning data is a one-shot iterator shorter than finetune_steps; "
                              "pass a DataLoader or a list")
