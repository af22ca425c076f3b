"""What a layer variant costs: parameters, storage bytes, FLOPs/MACs and BOPs.

Definitions (per sample, i.e. for a batch of one; only weight layers are counted):

* ``macs``: multiply-accumulates of the dense layer, counted by ``torch.utils.flop_counter``
  on the real module with its real input shape (``flops = 2 * macs``), times the variant's
  density (kept weights / weights): a pruned variant is charged only for its kept weights.
  A quantized weight that rounds to 0 still counts as kept (it is stored and multiplied).
* ``bops`` (bit operations, as in van Baalen et al. 2020): ``macs * b_w * b_a`` with b_w the
  weight bits (32 for float weights) and b_a the activation bits (a joint variant's own, else the
  space's ``act_bits``, 32 = float). A dense fp32 layer costs ``macs * 32 * 32``.
* ``bops_obc``: the accounting of OBC's code (Frantar & Alistarh 2022), linear in one shared bit
  width: ``macs * max(b_w, b_a)``, dense ``macs * 32``. So 8w8a is 4x, 4w4a 8x and 2:4 + 4w4a
  16x cheaper than dense fp32 there, while ``bops`` counts them 16x, 64x and 128x.
* ``params``: kept weights plus the bias.
* ``bytes``: the smallest of the formats below, plus the float32 bias.
  dense ``numel * b_w / 8``; unstructured: bitmask ``numel / 8`` + ``kept * b_w / 8``;
  N:M: ``kept * (b_w + ceil(log2 M)) / 8`` (an index per kept value); block-c: bitmask over
  blocks + ``kept_blocks * c * b_w / 8``; quantized variants add 4 bytes (fp16 scale and
  zero) per row.

    >>> prof = profile_layers(model, ["conv1", "fc1"], example_inputs=x[:1])
    >>> variant_costs(prof["fc1"], W_hat, variant)
    {'params': 8256.0, 'bytes': 4352.0, 'macs': 8192.0, 'flops': 16384.0, 'bops': 8388608.0}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._modes import eval_mode
from ..calib import num_columns, num_groups, resolve_layers
from ..calib.forwards import _forward
from ..calib.hessian import first_input
from ..config import Pattern
from ..errors import CalibrationError
from .variants import Variant  # one way: variants imports nothing from costs or factored


@dataclass(frozen=True)
class LayerProfile:
    """A layer's shape facts (the AMC state) and its dense per-sample cost."""

    name: str
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel: int  # kernel height (1 for linear)
    stride: int
    groups: int
    rows: int
    cols: int
    numel: int
    bias: int
    macs: float  # dense, per sample
    input_shape: tuple[int, ...]  # one sample, batch dim 1

    def dense_costs(self, act_bits: int = 32) -> dict[str, float]:
        """The costs of the uncompressed float32 layer."""
        return {"params": float(self.numel + self.bias), "bytes": 4.0 * (self.numel + self.bias),
                "macs": self.macs, "flops": 2 * self.macs, "bops": self.macs * 32 * act_bits,
                "bops_obc": self.macs * 32.0}


def _dense_macs(module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() / 2.0


def profile_layers(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, LayerProfile]:
    """Run one forward on `example_inputs` to learn each layer's input shape, then count its MACs.

    `example_inputs` is one batch of one sample (Tensor, (input, label) tuple or kwargs dict).

    >>> profile_layers(model, ["fc1"], torch.zeros(1, 1, 8, 8))["fc1"].macs
    32768.0
    """
    from ..calib.data import model_device, move_to, to_args_kwargs

    layers = resolve_layers(model, names)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in layers.items():
        def hook(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            shapes.setdefault(name, tuple(first_input(args, kwargs).shape))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            _forward(model, move_to(to_args_kwargs(example_inputs), model_device(model)))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in shapes]
    if missing:
        raise CalibrationError(f"layer(s) {missing} were not reached by the example inputs; pass a batch "
                               f"the model's forward accepts, or ignore these layers in the search space")
    out = {}
    for name, mod in layers.items():
        conv = isinstance(mod, nn.modules.conv._ConvNd)
        shape = (1, *shapes[name][1:]) if conv else (1, shapes[name][-1])
        x = torch.zeros(shape, dtype=mod.weight.dtype, device=mod.weight.device)
        rows = mod.weight.numel() // num_columns(mod)
        out[name] = LayerProfile(
            name=name, kind="conv" if conv else "linear",
            in_channels=int(mod.in_channels if conv else num_columns(mod)),
            out_channels=int(mod.out_channels if conv else rows),
            kernel=int(mod.kernel_size[0]) if conv else 1, stride=int(mod.stride[0]) if conv else 1,
            groups=num_groups(mod), rows=rows, cols=num_columns(mod), numel=mod.weight.numel(),
            bias=0 if getattr(mod, "bias", None) is None else mod.bias.numel(),
            macs=_dense_macs(mod, x), input_shape=shape)
    return out


def weight_bytes(numel: int, nnz: int, rows: int, bits: int, pattern: str, kept_blocks: int = 0) -> float:
    """Storage bytes of a weight with `nnz` kept values on `bits`-bit values (see the module docstring).

    >>> weight_bytes(1024, 512, 16, 32, "2:4")      # 512 values * (32 + 2 index bits) / 8
    2176.0
    """
    scales = 4.0 * rows if bits < 32 else 0.0
    dense = numel * bits / 8 + scales
    if nnz >= numel:
        return dense
    pat = Pattern.parse(pattern)
    if pat.kind == "nm":
        fmt = nnz * (bits + math.ceil(math.log2(pat.m))) / 8
    elif pat.kind == "block":
        kept_blocks = kept_blocks or math.ceil(nnz / pat.block)
        fmt = math.ceil(numel / pat.block / 8) + kept_blocks * pat.block * bits / 8
    else:
        fmt = math.ceil(numel / 8) + nnz * bits / 8
    return min(dense, fmt + scales)


def variant_costs(prof: LayerProfile, W_hat: torch.Tensor, variant: Variant, act_bits: int = 32) -> dict[str, float]:
    """Costs of `variant` given its actual compressed weight `W_hat` (prof.numel entries, any shape).

    >>> variant_costs(prof, torch.zeros_like(W), Variant("sp@0.5", (...,), sparsity=0.5))["macs"]
    0.0
    """
    kept = int((W_hat != 0).sum())
    if variant.bits < 32:  # a weight rounded to 0 on the grid is still stored and multiplied
        kept = round((1.0 - variant.sparsity) * prof.numel) if variant.sparsity else prof.numel
    kept_blocks = 0
    if variant.pattern.startswith("block"):
        kept_blocks = math.ceil(kept / Pattern.parse(variant.pattern).block)  # a kept block is (almost) never 0
    macs = prof.macs * kept / prof.numel
    a = variant.act_bits if variant.act_bits < 32 else act_bits
    return {"params": float(kept + prof.bias),
            "bytes": weight_bytes(prof.numel, kept, prof.rows, variant.bits, variant.pattern, kept_blocks)
            + 4.0 * prof.bias,
            "macs": macs, "flops": 2 * macs, "bops": macs * variant.bits * a,
            "bops_obc": macs * max(variant.bits, a)}
