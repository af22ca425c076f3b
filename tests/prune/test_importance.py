"""Importance criteria: a zeroed channel ranks lowest, random is seed-deterministic, OBS saliency is exact."""

import pytest
import torch
from prune_fixtures import (
    ConvBNConv,
    calib_batches,
    conv1_group,
    conv2_group,
    correlated_inputs,
    zero_channel_,
)

from brainsurgeon.errors import ConfigError
from brainsurgeon.prune import ChannelPruning, Stats, collect_stats, importance_needs, registered_importances, score
from brainsurgeon.prune.importance import channel_norms, obs_saliency, register_importance, slice_norms, slice_values
from brainsurgeon.prune.reconstruct import ReconStats, output_error, solve_reconstruction

MEANINGFUL = [n for n in registered_importances() if n != "random"]


@pytest.mark.parametrize("name", MEANINGFUL)
@pytest.mark.parametrize("make_group,channel", [(conv1_group, 3), (conv2_group, 0)])
def test_zeroed_channel_ranks_strictly_lowest(name, make_group, channel):
    model, group = ConvBNConv(), make_group()
    zero_channel_(model, group, channel)
    stats = collect_stats(model, [group], importance_needs(name), calib_batches())
    s = score(name, group, stats, ChannelPruning(importance=name))
    assert s.shape == (group.n,)
    others = torch.cat([s[:channel], s[channel + 1:]])
    assert s[channel] <= 1e-6 * s.abs().max() + 1e-12
    assert (others > s[channel]).all(), (name, s)


def test_random_is_seed_deterministic_and_seed_dependent():
    model, group = ConvBNConv(), conv1_group()
    a = score("random", group, Stats(model), ChannelPruning(importance="random", seed=1))
    b = score("random", group, Stats(model), ChannelPruning(importance="random", seed=1))
    c = score("random", group, Stats(model), ChannelPruning(importance="random", seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bn_scale_is_none_without_a_norm_layer():
    model, group = ConvBNConv(), conv2_group()
    no_bn = type(group)(tuple(s for s in group.slices if not s.module.startswith("bn")))
    assert score("bn_scale", no_bn, Stats(model), ChannelPruning(importance="bn_scale")) is None


def test_group_norm_normalisation_and_root_reduce():
    model, group = ConvBNConv(), conv1_group()
    s = score("group_l2", group, Stats(model), ChannelPruning(normalize="mean"))
    assert s.mean() == pytest.approx(1.0, rel=1e-5)
    raw = score("group_l2", group, Stats(model), ChannelPruning(normalize="none", reduce="root"))
    assert torch.allclose(raw, score("l2", group, Stats(model), ChannelPruning()), rtol=1e-5)


@pytest.mark.parametrize("make_group", [conv1_group, conv2_group])
@pytest.mark.parametrize("p", [1, 2])
def test_slice_norms_equal_the_gathered_slice_norms(make_group, p):
    model, group = ConvBNConv(), make_group()
    for s in group.slices:   # conv weights (4-D, both dims), BN vectors (1-D)
        want = slice_values(model, s).abs().pow(p).sum(1)
        assert torch.allclose(slice_norms(model, s, p), want, rtol=1e-5), s


@pytest.mark.parametrize("shape", [(7,), (300, 700), (16, 8, 3, 3), (1, 5, 1)])
def test_channel_norms_reduce_every_other_dim(shape):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for d in range(len(shape)):
        for p in (1, 2):
            want = t.movedim(d, 0).reshape(shape[d], -1).abs().pow(p).sum(1)
            assert torch.allclose(channel_norms(t, d, p), want, rtol=1e-4), (d, p)


def test_lamp_of_largest_channel_is_one():
    model, group = ConvBNConv(), conv1_group()
    s = score("lamp", group, Stats(model), ChannelPruning(importance="lamp"))
    assert s.max() == pytest.approx(1.0) and (s > 0).all()


def test_obs_saliency_equals_least_squares_removal_loss():
    """L_c = 1/2 w_C [(H^-1)_CC]^-1 w_C^T is the output loss ||(W - W')X||^2 / n of the best W' without C."""
    X = correlated_inputs(400, 12, seed=0)  # (n, cols)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    cols = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]])  # 6 channels of 2 columns
    sal = obs_saliency(W, H, cols, damp=0.0)
    G = X.T @ X
    for c in range(cols.shape[0]):
        keep = torch.tensor([j for j in range(12) if j not in cols[c].tolist()])
        st = ReconStats(G, G[:, keep], G[keep][:, keep], X.shape[0])
        M = solve_reconstruction(W, W[:, keep], st.A, st.B, damp=0.0)
        loss = output_error(W, M, st) * torch.trace(W @ G @ W.T) / X.shape[0]
        assert sal[c] == pytest.approx(float(loss), rel=1e-6)


def test_unknown_importance_and_double_registration_are_clear_errors():
    with pytest.raises(ConfigError, match="registered:.*group_l2"):
        ChannelPruning(importance="nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_importance("l1")(lambda g, s, c: None)


def test_collect_stats_leaves_no_trace():
    model, group = ConvBNConv(), conv1_group()
    model.train()
    model.conv1.weight.requires_grad_(False)
    bn_before = model.bn1.running_mean.clone()
    collect_stats(model, [group], ("grads", "fisher", "hessians", "apoz"), calib_batches())
    assert model.training and not model.conv1.weight.requires_grad
    assert model.conv1.weight.grad is None and model.bn1.weight.grad is None
    assert torch.equal(model.bn1.running_mean, bn_before)
