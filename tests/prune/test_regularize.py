"""Group-sparsity training drives the chosen groups' channel norms down (DepGraph / Network Slimming)."""

import pytest
import torch
import torch.nn.functional as F
from prune_fixtures import ConvBNConv, calib_batches, conv1_group, conv2_group

from brainsurgeon.errors import ConfigError
from brainsurgeon.prune import BNL1, GroupNormRegularizer


def _train(model, reg=None, steps=60, seed=0):
    torch.manual_seed(seed)
    data = calib_batches(n=4, batch=32, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if reg is not None:
            reg.step()
    return model.eval()


def test_group_regulariser_drives_the_weak_channels_to_zero():
    groups = [conv1_group(), conv2_group()]
    plain = _train(ConvBNConv(seed=0))
    model = ConvBNConv(seed=0)
    start = GroupNormRegularizer(groups, model).norms()
    reg = GroupNormRegularizer(groups, model, reg=1e-3, alpha=4, delta=2e-3, ratio=0.5)
    _train(model, reg)
    with_reg, without = reg.norms(model), reg.norms(plain)
    for g, a, b, s in zip(groups, with_reg, without, start, strict=True):
        weak = torch.argsort(a)[: g.n // 2]
        assert a[weak].mean() < 0.2 * b[weak].mean()  # the chosen channels are driven down ...
        assert a.sum() < s.sum()  # ... and the group's total norm shrinks
    assert float(reg.penalty(model).detach()) > 0


def test_bn_l1_shrinks_scales():
    plain = _train(ConvBNConv(seed=1), seed=1)
    model = ConvBNConv(seed=1)
    _train(model, BNL1(model, reg=5e-2), seed=1)
    for name in ("bn1", "bn2"):
        a = model.get_submodule(name).weight.abs().sum()
        b = plain.get_submodule(name).weight.abs().sum()
        assert a < 0.8 * b


def test_regulariser_errors():
    with pytest.raises(ConfigError, match="no groups given"):
        GroupNormRegularizer([], ConvBNConv())
    with pytest.raises(ConfigError, match="not affine BatchNorm modules"):
        BNL1(ConvBNConv(), modules=["conv1"])


def test_regulariser_on_dependency_graph_groups():
    from brainsurgeon.graph import DependencyGraph
    from brainsurgeon.models import build_model

    model = build_model("digits-cnn", seed=0).eval()
    groups = DependencyGraph(model, torch.zeros(1, 1, 8, 8)).groups()
    reg = GroupNormRegularizer(groups, model, reg=1e-3)
    assert [n.shape[0] for n in reg.norms()] == [g.n for g in groups]
    reg.penalty(model).backward()
    assert model.conv2.weight.grad.abs().sum() > 0 and model.bn2.weight.grad.abs().sum() > 0
