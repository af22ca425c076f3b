"""Every verb and measurement that switches a model to eval gives each submodule its own train/eval flag
back (a frozen BatchNorm inside a training model stays frozen), also when the call fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from brainsurgeon._modes import eval_mode
from brainsurgeon.calib import reestimate_batchnorm_
from brainsurgeon.distill.loop import evaluate_metric
from brainsurgeon.models.train import evaluate
from brainsurgeon.quant.equalize import equalize_
from brainsurgeon.quant.measure import count_macs, time_model
from brainsurgeon.quant.smooth import smooth_quant_


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    m.train()
    m[1].eval()  # frozen statistics while the rest trains
    return m


def _flags(m: nn.Module) -> list[bool]:
    return [s.training for s in m.modules()]


X = torch.randn(32, 8)
DS = TensorDataset(X, torch.randint(0, 4, (32,)))
CALLS = {
    "count_macs": lambda m: count_macs(m, X),
    "time_model": lambda m: time_model(m, X, warmup=0, min_run_time=0.0),
    "evaluate": lambda m: evaluate(m, DS),
    "evaluate_metric": lambda m: evaluate_metric(m, DS),
    "smooth_quant_": lambda m: smooth_quant_(m, [X]),
    "equalize_": lambda m: equalize_(m, [X]),
    "reestimate_batchnorm_": lambda m: reestimate_batchnorm_(m, [X]),  # trains the BNs inside
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_mixed_train_flags_come_back(name):
    m = _mixed()
    flags = _flags(m)
    CALLS[name](m)
    assert _flags(m) == flags


def test_eval_mode_of_several_models_restores_each_also_on_error():
    a, b = _mixed(), _mixed()
    fa, fb = _flags(a), _flags(b)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(a, b):
        assert not any(_flags(a) + _flags(b))
        raise RuntimeError("boom")
    assert _flags(a) == fa and _flags(b) == fb
