"""Structured channel-ratio variants: remove a fraction of one layer's output channels with ``prune_``.

A channel variant ``ch@r`` of layer l is :class:`brainsurgeon.prune.ChannelPruning` at ratio r with
every other layer's output channels protected (``ignore``), so the surgery (the dependency graph)
also shrinks l's consumers: the variant's cost is l's dense cost minus the whole model's measured
saving (it can be negative when the consumers save more than l costs). Costs are therefore
additive across layers only approximately (two adjacent pruned layers overlap in their shared
consumer); ``apply_plan_`` measures the real result. Channel variants change consumer shapes, so
they live in a search space of their own (no per-weight variants beside them).

    >>> space = SearchSpace(levels=0, nm=(), block_sparsities=(), bits=(), nm_bits=(), channel_ratios=(0.25, 0.5))
    >>> model2 = pruned_copy(model, "conv2", ChannelPruning(ratio=0.5), example, calib, names)
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from torch import nn

from ..config import Config
from .costs import LayerProfile, profile_layers


def is_channel_config(cfg: Config) -> bool:
    """Whether `cfg` removes channels structurally (a ``prune`` verb config)."""
    return type(cfg).verb == "prune"


def layer_cfg(cfg: Any, layer: str, names: list[str]) -> Any:
    """`cfg` restricted to `layer`: every other supported layer's output channels are ignored."""
    return dataclasses.replace(cfg, ignore=tuple(re.escape(n) for n in names if n != layer))


def prune_layer_(model: nn.Module, layer: str, cfg: Any, example: Any, calib: Any, names: list[str]) -> None:
    """Remove channels of `layer` in place (``brainsurgeon.prune.prune_``; restores itself on failure)."""
    from ..prune import prune_

    prune_(model, layer_cfg(cfg, layer, names), example_inputs=example, calib=calib)


def pruned_copy(model: nn.Module, layer: str, cfg: Any, example: Any, calib: Any, names: list[str]) -> nn.Module:
    """A deep copy of `model` with only `layer`'s channels removed."""
    m = copy.deepcopy(model)
    prune_layer_(m, layer, cfg, example, calib, names)
    return m


def channel_costs(dense: dict[str, LayerProfile], pruned: nn.Module, layer: str, example: Any,
                  act_bits: int) -> dict[str, float]:
    """Costs of the channel variant of `layer`: its dense cost minus the whole model's saving."""
    after = profile_layers(pruned, list(dense), example)
    out = {}
    for metric in ("params", "bytes", "macs", "flops", "bops", "bops_obc"):
        saving = sum(p.dense_costs(act_bits)[metric] for p in dense.values()) - sum(
            p.dense_costs(act_bits)[metric] for p in after.values())
        out[metric] = dense[layer].dense_costs(act_bits)[metric] - saving
    return out


def apply_channels_(model: nn.Module, items: list[tuple[str, Any]], example: Any, calib: Any,
                    names: list[str]) -> None:
    """Prune each (layer, config) in order, in place; on failure the whole model is put back (same objects)."""
    from .._state import ModelSnapshot

    snapshot = ModelSnapshot(model).keep_all()  # channel surgery may write values in place
    try:
        for layer, cfg in items:
            prune_layer_(model, layer, cfg, example, calib, names)
    except BaseException:
        snapshot.restore_()  # in place: the caller's Parameter and Module objects survive
        raise


class ChannelWalk:
    """AMC's environment over a channel space: prune layer after layer on a copy, measuring the real cost.

    ``reset()`` starts from the dense model; ``step(layer, cfg)`` removes `layer`'s channels
    (``cfg=None``: keep it) and returns the whole model's measured cost (absolute, over the
    supported layers), so couplings between layers are counted as they happen (AMC, sec. 3.2).

    >>> walk = ChannelWalk(model, names, example, calib, "flops"); walk.reset()
    >>> walk.step("conv1", ChannelPruning(ratio=0.5))
    """

    def __init__(self, model: nn.Module, names: list[str], example: Any, calib: Any, metric: str,
                 act_bits: int = 32) -> None:
        self.base, self.names, self.example, self.calib = model, names, example, calib
        self.metric, self.act_bits = metric, act_bits
        self.model = model
        self.cost = self.measure()

    def measure(self) -> float:
        prof = profile_layers(self.model, self.names, self.example)
        return sum(p.dense_costs(self.act_bits)[self.metric] for p in prof.values())

    def reset(self) -> None:
        self.model = copy.deepcopy(self.base)
        self.cost = self.measure()

    def step(self, layer: str, cfg: Any | None) -> float:
        if cfg is not None:
            prune_layer_(self.model, layer, cfg, self.example, self.calib, self.names)
            self.cost = self.measure()
        return self.cost


def measured_fraction(model: nn.Module, items: list[tuple[str, Any]], example: Any, calib: Any,
                      names: list[str], metric: str, act_bits: int = 32) -> float:
    """The real cost (fraction of dense, over the supported layers) after pruning `items` on a copy."""
    dense = profile_layers(model, names, example)
    m = copy.deepcopy(model)
    apply_channels_(m, items, example, calib, names)
    after = profile_layers(m, names, example)
    total = sum(p.dense_costs(act_bits)[metric] for p in dense.values())
    return sum(p.dense_costs(act_bits)[metric] for p in after.values()) / total
