"""Costs: flop_counter MACs equal the textbook counts, BOPs/bytes follow their definitions."""

import pytest
import torch
from torch import nn

from brainsurgeon.config import OBQ, ExactOBS
from brainsurgeon.search import Variant, profile_layers, variant_costs, weight_bytes


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.down(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def prof():
    return profile_layers(ConvNet(), ["conv", "down", "fc"], torch.zeros(1, 4, 8, 8))


def test_macs_match_textbook_counts(prof):
    assert prof["conv"].macs == 8 * 4 * 9 * 8 * 8  # out * in * k * k * H * W
    assert prof["down"].macs == 8 * (8 // 2) * 9 * 4 * 4  # grouped conv, stride 2
    assert prof["fc"].macs == 128 * 10
    assert prof["down"].groups == 2 and prof["down"].stride == 2 and prof["fc"].kind == "linear"
    assert prof["conv"].input_shape == (1, 4, 8, 8)


def test_dense_costs_and_bops_definition(prof):
    d = prof["fc"].dense_costs()
    assert d == {"params": 1290.0, "bytes": 4 * 1290.0, "macs": 1280.0, "flops": 2560.0, "bops": 1280.0 * 32 * 32,
                 "bops_obc": 1280.0 * 32}
    assert prof["fc"].dense_costs(act_bits=8)["bops"] == 1280.0 * 32 * 8


def test_sparse_and_quantized_variant_costs(prof):
    p = prof["fc"]
    W = torch.randn(10, 128)
    W[:, ::2] = 0  # exactly half the weights
    sparse = variant_costs(p, W, Variant("sp@0.5", (ExactOBS(sparsity=0.5),), sparsity=0.5))
    assert sparse["macs"] == 640 and sparse["params"] == 640 + 10
    assert sparse["bytes"] == 1280 / 8 + 640 * 4 + 40  # bitmask + fp32 values + bias
    q = variant_costs(p, W, Variant("w4", (OBQ(bits=4),), bits=4))  # grid zeros still count as weights
    assert q["macs"] == 1280 and q["bops"] == 1280 * 4 * 32
    assert q["bytes"] == 1280 * 4 / 8 + 4 * 10 + 40


def test_weight_bytes_formats():
    assert weight_bytes(1024, 1024, 16, 32, "unstructured") == 4096  # dense
    assert weight_bytes(1024, 512, 16, 32, "2:4") == 512 * 34 / 8
    assert weight_bytes(1024, 512, 16, 4, "2:4") == 512 * 6 / 8 + 64
    assert weight_bytes(1024, 512, 16, 32, "block4") == 32 + 128 * 4 * 4
    assert weight_bytes(1024, 1000, 16, 32, "unstructured") == 4096  # a bitmask would be larger
