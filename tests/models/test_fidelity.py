"""Agreement, KL and the accuracy interval: the measures that separate runs whose accuracy ties."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from brainsurgeon.models.fidelity import fidelity, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(358, 360)
    assert lo == pytest.approx(0.97997, abs=1e-4) and hi == pytest.approx(0.99847, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="n must be > 0"):
        wilson_interval(0, 0)


def test_identical_model_agrees_fully_and_a_perturbed_one_less():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).train()
    x = torch.randn(300, 8)
    ds = TensorDataset(x, net(x).argmax(1).detach())
    f = fidelity(net, copy.deepcopy(net), ds, batch_size=64)
    assert (f.accuracy, f.agreement, f.kl, f.n) == (1.0, 1.0, 0.0, 300)
    assert net.training  # mode restored
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[2].weight.add_(0.3 * torch.randn_like(other[2].weight))
    g = fidelity(net, other, ds)
    assert g.agreement == g.accuracy < 1.0 and g.kl > 0  # labels are the reference's predictions
    assert g.ci[0] < g.accuracy < g.ci[1]
