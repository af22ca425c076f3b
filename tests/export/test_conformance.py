"""Conformance: every module format registered by brainsurgeon saves and reloads to identical outputs.

Each format gets a small instance below; the round trip wraps it as ``nn.Sequential(m)`` and
reloads into ``nn.Sequential(nn.Identity())``, so the format is rebuilt from its spec alone.
A newly registered format without an entry here fails ``test_every_registered_format_is_covered``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from brainsurgeon.export import load, read_manifest, save
from brainsurgeon.formats import module_format, registered_module_formats

for _mod in ("brainsurgeon.quant", "brainsurgeon.quant.packed", "brainsurgeon.quant.dynamic",
             "brainsurgeon.quant.packed_conv", "brainsurgeon.quant.sparse", "brainsurgeon.lowrank",
             "brainsurgeon.share"):
    try:
        importlib.import_module(_mod)
    except ImportError:
        pass


def _lin(i: int = 64, o: int = 32, zero: float = 0.0) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.masked_fill_(lin.weight.abs() < zero, 0.0)
    return lin


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(4, 8, 3, padding=1)


def _factories() -> dict[str, Callable[[], nn.Module]]:
    f: dict[str, Callable[[], nn.Module]] = {}
    names = set(registered_module_formats())
    if "int8_weight_only_linear" in names:
        f["int8_weight_only_linear"] = lambda: module_format("int8_weight_only_linear").from_linear(
            _lin(), group_size=32, rtn=True)
        f["int4_weight_only_linear"] = lambda: module_format("int4_weight_only_linear").from_linear(
            _lin(), group_size=32, rtn=True)
    if "dynamic_int8_linear" in names:
        f["dynamic_int8_linear"] = lambda: module_format("dynamic_int8_linear").from_linear(_lin(), rtn=True)
    if "packed_conv2d" in names:
        f["packed_conv2d"] = lambda: module_format("packed_conv2d").from_conv(_conv(), bits=4, rtn=True)
    if "sparse_linear" in names:
        f["sparse_linear"] = lambda: module_format("sparse_linear").from_linear(_lin(zero=0.08), "csr")
    if "lowrank_linear" in names:
        f["lowrank_linear"] = lambda: module_format("lowrank_linear")(64, 32, rank=5)
        f["lowrank_conv2d"] = lambda: module_format("lowrank_conv2d")(4, 8, 3, kernel_size=(3, 3), padding=(1, 1))
        f["tucker2_conv2d"] = lambda: module_format("tucker2_conv2d")(4, 8, 2, 3, kernel_size=(3, 3),
                                                                       padding=(1, 1))
    if "act_quant_linear" in names:
        f["act_quant_linear"] = lambda: _act(_lin(), "tensor")
        f["act_quant_conv2d"] = lambda: _act(_conv(), "channel")
        f["act_quant_conv1d"] = lambda: _act(nn.Conv1d(4, 8, 3, padding=1), "tensor")
    if "static_int8_linear" in names:
        f["static_int8_linear"] = lambda: module_format("static_int8_linear").from_act_linear(
            _act(_lin(), "tensor", bits=8), rtn=True)
    if "spatial_separable_conv2d" in names:  # compact-design transforms (lowrank/compact.py)
        f["spatial_separable_conv2d"] = lambda: module_format("spatial_separable_conv2d")(
            4, 8, 3, kernel_size=(3, 3), stride=(2, 1), padding=(1, 1))
        f["depthwise_separable_conv2d"] = lambda: module_format("depthwise_separable_conv2d")(
            4, 8, 2, kernel_size=(3, 3), padding=(1, 1))
    if "channel_clamp" in names:  # cross-layer equalization's per-channel ReLU6 (quant/equalize.py)
        f["channel_clamp"] = _clamp
    return f


def _clamp() -> nn.Module:
    m = module_format("channel_clamp")(8)
    with torch.no_grad():  # rescaled-looking bounds, not the defaults
        m.hi.uniform_(0.5, 6.0, generator=torch.Generator().manual_seed(1))
        m.lo.uniform_(-0.5, 0.0, generator=torch.Generator().manual_seed(2))
    return m


def _act(layer: nn.Module, granularity: str, bits: int = 6) -> nn.Module:
    from brainsurgeon.config import ActQuant
    from brainsurgeon.quant.act import with_act_quant

    m = with_act_quant(layer, ActQuant(bits=bits, granularity=granularity))
    with torch.no_grad():  # calibrated-looking scales, not the defaults
        m.input_quantizer.scale.uniform_(0.02, 0.1, generator=torch.Generator().manual_seed(1))
        m.input_quantizer.zero.fill_(21.0)
    return m


FACTORIES = _factories()


def _input(m: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if hasattr(m, "in_features"):
        return torch.randn(3, m.in_features, generator=g)
    if not hasattr(m, "in_channels"):  # ChannelClamp: (N, C, H, W) around its bounds
        return 4 * torch.randn(2, m.lo.numel(), 8, 8, generator=g)
    if isinstance(m, nn.Conv1d):
        return torch.randn(2, m.in_channels, 8, generator=g)
    return torch.randn(2, m.in_channels, 8, 8, generator=g)


def test_every_registered_format_is_covered():
    ours = [n for n in registered_module_formats() if module_format(n).__module__.startswith("brainsurgeon.")]
    missing = sorted(set(ours) - set(FACTORIES))
    assert not missing, f"add a small instance of {missing} to FACTORIES in tests/export/test_conformance.py"


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_format_round_trip_from_spec_alone(tmp_path, name):
    m = FACTORIES[name]().eval()
    assert getattr(type(m), "format_name", None) == name
    spec = m.spec()
    json.dumps(spec, allow_nan=False)  # raises unless the spec is plain JSON
    empty = type(m).from_spec(json.loads(json.dumps(spec)))
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in m.state_dict().items()}  # from_spec builds every tensor at its shape
    x = _input(m)
    with torch.no_grad():
        ref = m(x)
    save(nn.Sequential(m), str(tmp_path / "ck"))
    assert read_manifest(str(tmp_path / "ck"))["modules"]["0"]["format"] == name
    again = load(str(tmp_path / "ck"), lambda: nn.Sequential(nn.Identity())).eval()
    assert type(again[0]) is type(m)
    with torch.no_grad():
        assert torch.equal(again(x), ref)
