"""pack_: swaps quantized layers for packed modules, exactly, atomically, and after quantize_."""

import copy

import pytest
import torch
from torch import nn

from brainsurgeon.api import quantize_
from brainsurgeon.config import GPTQ, config_from_dict
from brainsurgeon.errors import ConfigError
from brainsurgeon.quant import (
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    Pack,
    PackedConv2d,
    pack_,
)
from brainsurgeon.quant.grid import fit_grid


@pytest.fixture(autouse=True)
def _one_thread():
    """Small kernels on a shared 2-core machine: one intra-op thread avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class ConvMLP(nn.Module):
    """A conv stem and a two-layer MLP head: one of each packable layer type."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _rtn_reference(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """The model with every weight rounded on the same grid pack_(rtn=True) uses (float math)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                W = m.weight.reshape(m.weight.shape[0], -1)
                gs = 0 if group_size in (0, W.shape[1]) else group_size
                m.weight.copy_(fit_grid(W, bits, True, gs).quantize(W).reshape(m.weight.shape))
    return ref


def _check_rows_and_output(model, ref, rows, names):
    assert [r.name for r in rows] == names
    modules = dict(model.named_modules())
    for r in rows:
        assert r.packed_bytes < r.dense_bytes and r.kernel == modules[r.name].kernel
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_pack_int8_swaps_every_layer_and_keeps_the_rounded_model_output():
    torch.manual_seed(0)
    model = ConvMLP()
    ref = _rtn_reference(model, 8, 0)
    rows = pack_(model, Pack(bits=8, group_size=0, rtn=True, compute_dtype="float32"))
    assert type(model.conv) is PackedConv2d
    assert type(model.fc1) is Int8WeightOnlyLinear and type(model.fc2) is Int8WeightOnlyLinear
    _check_rows_and_output(model, ref, rows, ["conv", "fc1", "fc2"])


def test_pack_int4_groups_leave_the_model_untouched_when_one_layer_does_not_fit():
    torch.manual_seed(0)
    model = ConvMLP()
    ref = _rtn_reference(model, 4, 32)
    cfg = Pack(bits=4, group_size=32, rtn=True, compute_dtype="float32")
    with pytest.raises(ConfigError, match=r"layer conv: group_size=32 does not divide in_features=27"):
        pack_(model, cfg)  # the conv has 3*3*3 = 27 columns
    assert type(model.conv) is nn.Conv2d and type(model.fc1) is nn.Linear  # untouched on failure
    d = cfg.to_dict()
    d["convs"] = False
    rows = pack_(model, config_from_dict(d))
    assert type(model.fc1) is Int4WeightOnlyLinear and type(model.fc2) is Int4WeightOnlyLinear
    ref.conv = model.conv  # still the float conv on both sides
    _check_rows_and_output(model, ref, rows, ["fc1", "fc2"])


def test_packed_conv_is_swapped_when_groups_fit():
    torch.manual_seed(0)
    model = ConvMLP()
    pack_(model, Pack(bits=4, group_size=0, rtn=True))
    assert type(model.conv) is PackedConv2d and type(model.fc1) is Int4WeightOnlyLinear


def test_ignore_and_dynamic_int8():
    torch.manual_seed(0)
    model = ConvMLP()
    rows = pack_(model, Pack(bits=8, group_size=0, activations="dynamic_int8", rtn=True, convs=False),
                 ignore=("fc2",))
    assert [r.name for r in rows] == ["fc1"] and type(model.fc1) is DynamicInt8Linear
    assert type(model.fc2) is nn.Linear and type(model.conv) is nn.Conv2d
    assert rows[0].format == "dynamic_int8_linear"


def test_quantize_then_pack_reproduces_the_quantized_model():
    """GPTQ leaves weights on a 4-bit grid; packing them (no rounding) keeps the outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    calib = [torch.randn(32, 64) for _ in range(4)]
    quantize_(model, GPTQ(bits=4, group_size=32), calib=calib)
    quantized = copy.deepcopy(model)
    pack_(model, Pack(bits=4, group_size=32, compute_dtype="float32"))
    for i in (0, 2):
        W = quantized[i].weight.detach()
        a, b = model[i].dequantize() + 0.0, W + 0.0  # -0.0 + 0.0 is +0.0: a signed zero is the same value
        ulps = (a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max()
        assert ulps <= 1  # codes exact; float32 scale vs float64 solver arithmetic
    x = torch.randn(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), quantized(x), rtol=1e-5, atol=1e-5)


def test_float_weights_are_not_silently_rounded():
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ConfigError, match=r"layer 0: .*not on a 4-bit grid.*rtn=True"):
        pack_(model, Pack(bits=4, group_size=32))
    assert type(model[0]) is nn.Linear


def test_int4_shape_error_names_the_layer_rule_and_fix():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40))
    with pytest.raises(ConfigError, match=r"out_features % 16 == 0.*bits=8 or leave it out"):
        pack_(model, Pack(bits=4, group_size=32, rtn=True))
    assert type(model[0]) is nn.Linear  # nothing swapped


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 9}, r"Pack: bits must be an integer in \[2, 8\]"),
    ({"group_size": -1}, "group_size must be 0"),
    ({"activations": "int4"}, "activations must be one of"),
    ({"compute_dtype": "float64"}, "compute_dtype must be one of"),
    ({"bits": 4, "activations": "dynamic_int8"}, "needs bits=8 and group_size=0"),
])
def test_pack_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Pack(**kwargs)


def test_pack_config_round_trips_through_dict():
    cfg = Pack(bits=8, group_size=0, activations="dynamic_int8")
    assert config_from_dict(cfg.to_dict()) == cfg


def test_nothing_to_pack_is_an_error():
    with pytest.raises(ConfigError, match="no nn.Linear"):
        pack_(nn.Sequential(nn.ReLU()), Pack())
