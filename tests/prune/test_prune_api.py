"""prune_ on real models through the DependencyGraph: exact counts, guards, reconstruction, rollback."""

import math

import pytest
import torch
from prune_fixtures import ConvBNConv, TinyMHA, calib_batches

from brainsurgeon.errors import CalibrationError, ConfigError
from brainsurgeon.models import build_model
from brainsurgeon.prune import ChannelPruning, keep_count, measure, prune_, prune_table

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
WIDTHS = {"conv1": 16, "conv2": 32, "conv3": 32, "fc1": 64}  # DigitsCNN's prunable widths


def digits(seed=0):
    return build_model("digits-cnn", seed=seed).eval()


def widths(m):
    return {"conv1": m.conv1.out_channels, "conv2": m.conv2.out_channels, "conv3": m.conv3.out_channels,
            "fc1": m.fc1.out_features}


def digits_calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("ratio,round_to", [(0.5, 1), (0.3, 1), (0.3, 8), (0.6, 4)])
def test_local_exact_channel_counts(ratio, round_to):
    m = digits()
    rep = prune_(m, ChannelPruning(ratio=ratio, round_to=round_to), X)
    assert widths(m) == {k: keep_count(n, ratio, round_to) for k, n in WIDTHS.items()}
    assert m.fc2.out_features == 10 and m(X).shape == (2, 10)  # output kept
    assert rep.metrics["params"]["after"] == sum(p.numel() for p in m.parameters())
    assert rep.metrics["macs"]["after"] == measure(m, X).total_macs < rep.metrics["macs"]["before"]


@pytest.mark.parametrize("ratio,mlr", [(0.5, 0.6), (0.4, 0.5)])
def test_global_scope_respects_max_layer_ratio(ratio, mlr):
    m = digits(seed=1)
    prune_(m, ChannelPruning(ratio=ratio, scope="global", max_layer_ratio=mlr, importance="l2"), X)
    w = widths(m)
    for k, n in WIDTHS.items():
        assert w[k] >= keep_count(n, mlr), (k, w)
    assert sum(WIDTHS.values()) - sum(w.values()) == math.floor(ratio * sum(WIDTHS.values()))


def test_iterative_steps_reach_the_same_widths_and_keep_the_mode():
    m = digits().train()
    rep = prune_(m, ChannelPruning(ratio=0.5, steps=3), X)
    assert widths(m) == {k: keep_count(n, 0.5) for k, n in WIDTHS.items()}
    assert m.training
    assert "3 step(s)" in " ".join(rep.notes)


def test_ignore_keeps_a_module_and_bad_pattern_is_named():
    m = digits()
    prune_(m, ChannelPruning(ratio=0.5, ignore=("conv1",)), X)
    assert m.conv1.out_channels == 16 and m.conv2.out_channels == 16
    with pytest.raises(ConfigError, match="pattern 'nope' matches no module"):
        prune_(digits(), ChannelPruning(ignore=("nope",)), X)


def test_pruning_a_zeroed_channel_keeps_outputs():
    """Zero every slice of conv2 channel 5, prune one channel by L2: exactly that one goes, outputs unchanged."""
    m = digits()
    with torch.no_grad():
        m.conv2.weight[5] = 0
        m.bn2.weight[5], m.bn2.bias[5], m.bn2.running_mean[5] = 0, 0, 0
        m.conv3.weight[:, 5] = 0
        ref = m(X)
    prune_(m, ChannelPruning(ratio=1 / 32, importance="l2", ignore=("conv1", "conv3", "fc1")), X)
    assert m.conv2.out_channels == 31 and m.conv3.in_channels == 31
    assert torch.allclose(m(X), ref, atol=1e-6)


@pytest.mark.parametrize("same_shapes", [True, False])
def test_obs_reconstruction_beats_plain_removal_on_the_consumers_and_the_output(same_shapes):
    dense = ConvBNConv(seed=3)
    calib = calib_batches(n=4, batch=32, seed=1)
    if not same_shapes:  # batches that do not concatenate take the per-consumer path
        calib = [(b[0][:, :, : 8 - i], b[1]) for i, b in enumerate(calib)]
    x = torch.cat([b[0] for b in calib_batches(n=2, batch=32, seed=9)])
    ref = dense(x)
    plain, recon = ConvBNConv(seed=3), ConvBNConv(seed=3)
    prune_(plain, ChannelPruning(ratio=0.5, importance="l2"), x[:1])
    cfg = ChannelPruning(ratio=0.5, importance="l2", reconstruct="obs")
    rep = prune_(recon, cfg, x[:1], calib=calib)
    # conv2 has no bias: its re-solved offset went into bn2's running mean
    assert not torch.allclose(recon.bn2.running_mean, plain.bn2.running_mean)
    assert widths_of(plain) == widths_of(recon) == (4, 3)
    errs = {r.name: r.rel_loss for r in rep.rows if r.name in ("conv2", "fc")}
    assert set(errs) == {"conv2", "fc"}
    note = [n for n in rep.notes if n.startswith("OBS reconstruction")][0]
    before, after = (float(v) for v in note.split("error ")[1].split(" (plain removal) -> "))
    assert after < before
    assert (recon(x) - ref).pow(2).sum() < (plain(x) - ref).pow(2).sum()


def widths_of(m):
    return m.conv1.out_channels, m.conv2.out_channels


@pytest.mark.parametrize("importance", ["taylor", "obs", "apoz", "hessian"])
def test_data_driven_criteria_run_end_to_end(importance):
    m = digits()
    prune_(m, ChannelPruning(ratio=0.25, importance=importance), X, calib=digits_calib())
    assert widths(m) == {k: keep_count(n, 0.25) for k, n in WIDTHS.items()}


def test_failure_restores_the_model_exactly():
    m = digits()
    m.train()
    params = {n: p for n, p in m.named_parameters()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    bad = [torch.randn(4, 1, 8, 8), torch.randn(4, 3, 8, 8)]  # second batch has the wrong channel count
    with pytest.raises((CalibrationError, RuntimeError)):
        prune_(m, ChannelPruning(ratio=0.5, reconstruct="obs"), X, calib=bad)
    assert widths(m) == WIDTHS and m.conv2.in_channels == 16 and m.bn2.num_features == 32
    assert all(p is params[n] for n, p in m.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert m.training


def test_clear_errors_before_any_change():
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune_(digits(), ChannelPruning(importance="taylor"), X)
    with pytest.raises(ConfigError, match="needs a ChannelPruning config"):
        prune_(digits(), {"ratio": 0.5}, X)
    with pytest.raises(ConfigError, match="example_inputs is required"):
        prune_(digits(), ChannelPruning(), None)


def test_report_rows_and_table():
    m = digits()
    rep = prune_(m, ChannelPruning(ratio=0.5), X)
    rows = {r.name: r for r in rep.rows}
    assert rows["conv2"].params == m.conv2.weight.numel() and rows["conv2"].params_before == 32 * 16 * 9
    assert rows["conv2"].macs == rows["conv2"].macs_before // 4
    text = prune_table(rep)
    assert "conv2" in text and "macs:" in text and "x smaller" in text


def test_attention_heads_are_pruned_whole():
    m = TinyMHA()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    prune_(m, ChannelPruning(ratio=0.5), x)
    assert (m.att.embed_dim, m.att.num_heads, m.att.head_dim) == (8, 2, 4)  # 2 of 4 heads removed whole
    assert m.fc.out_features == 8 and m(x).shape == (2, 5, 3)


def test_random_pruning_is_reproducible():
    a, b, c = digits(), digits(), digits()
    for m, seed in ((a, 1), (b, 1), (c, 2)):
        prune_(m, ChannelPruning(ratio=0.5, importance="random", seed=seed), X)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
