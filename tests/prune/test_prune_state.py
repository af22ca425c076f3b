"""prune_ leaves no trace beyond the documented change: flags, grads, identity (issue 13 #14, #1 for prune_)."""

import pytest
import torch
from torch import nn

from brainsurgeon._state import ModelSnapshot
from brainsurgeon.errors import CalibrationError
from brainsurgeon.models import build_model
from brainsurgeon.prune import ChannelPruning, prune_

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _calib(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("reconstruct", ["none", "obs"])
def test_per_submodule_train_flags_survive(reconstruct):
    m = build_model("digits-cnn", seed=0).train()
    m.bn1.eval()   # a frozen BatchNorm inside a training model
    flags = {n: mod.training for n, mod in m.named_modules()}
    prune_(m, ChannelPruning(ratio=0.5, reconstruct=reconstruct), X,
           calib=_calib() if reconstruct == "obs" else None)
    assert {n: mod.training for n, mod in m.named_modules()} == flags


def test_taylor_leaves_no_grad():
    m = build_model("digits-cnn", seed=0).eval()
    prune_(m, ChannelPruning(ratio=0.5, importance="taylor", ignore=("fc2",)), X, calib=_calib())
    assert [n for n, p in m.named_parameters() if p.grad is not None] == []


def test_failure_keeps_objects_attributes_and_flags():
    m = build_model("digits-cnn", seed=0).train()
    m.bn2.eval()
    params = dict(m.named_parameters())
    mods = dict(m.named_modules())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    flags = {n: mod.training for n, mod in m.named_modules()}
    bad = [torch.randn(4, 1, 8, 8), torch.randn(4, 3, 8, 8)]
    with pytest.raises((CalibrationError, RuntimeError)):
        prune_(m, ChannelPruning(ratio=0.5, reconstruct="obs"), X, calib=bad)
    assert all(p is params[n] for n, p in m.named_parameters())
    assert all(mod is mods[n] for n, mod in m.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    assert (m.conv1.out_channels, m.conv2.in_channels, m.bn1.num_features) == (16, 16, 16)


def test_undo_log_restores_config_objects_in_place():
    class Cfg:
        def __init__(self):
            self.hidden = 8
            self.heads = [2, 4]

        def to_dict(self):
            return dict(vars(self))

    m = nn.Linear(8, 8)
    m.config = cfg = Cfg()
    log = ModelSnapshot(m)
    w = m.weight
    m.weight.data = m.weight.data[:4]
    m.out_features = 4
    cfg.hidden = 4
    cfg.heads[0] = 1
    log.restore_()
    assert m.config is cfg and cfg.hidden == 8 and cfg.heads == [2, 4]
    assert m.weight is w and m.weight.shape == (8, 8) and m.out_features == 8
