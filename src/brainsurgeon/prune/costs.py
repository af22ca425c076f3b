"""Measured costs of a model: parameters and MACs per module (MACs from ``FlopCounterMode``).

    >>> c = measure(model, example_inputs)
    >>> c.macs["conv2"], c.params["conv2"], c.total_macs
    (294912, 4608, 485184)

MACs are half the FLOPs ``torch.utils.flop_counter`` counts for matmul/conv ops (one
multiply-add = 2 FLOPs), attributed to the innermost module that ran the op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Costs:
    """Parameters (own, not recursive) and MACs per module name, plus totals."""

    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    total_params: int = 0
    total_macs: int = 0


def call(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs: a Tensor, a tuple of positional args or a dict of kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*example_inputs)


def measure(model: nn.Module, example_inputs: Any) -> Costs:
    """Params and MACs of every module on one eval-mode forward of `example_inputs`.

    >>> measure(nn.Linear(4, 2), torch.zeros(3, 4)).total_macs
    24
    """
    out = Costs()
    for name, mod in model.named_modules():
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        if n:
            out.params[name] = n
    out.total_params = sum(p.numel() for p in model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            call(model, example_inputs)
    finally:
        model.train(was)
    root = type(model).__name__
    counts = fc.get_flop_counts()
    names = {n for n, _ in model.named_modules()}
    for key, ops in counts.items():
        if key == "Global":
            out.total_macs = sum(ops.values()) // 2
            continue
        name = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        if name in names:
            out.macs[name] = sum(ops.values()) // 2
    incl = dict(out.macs)  # a module's count includes its children's: keep its own ops only
    for name in incl:
        anc = name
        while anc:
            anc = anc.rsplit(".", 1)[0] if "." in anc else ""
            if anc in incl and anc != name:
                out.macs[anc] -= incl[name]
                break
    out.macs = {k: v for k, v in out.macs.items() if v}
    return out
