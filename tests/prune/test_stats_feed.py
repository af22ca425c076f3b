"""prune.collect_stats: Hessians from the driver's feed (bit-identical to the plain loop on a CNN), APoZ over the
calibration data less its padding tokens."""

import sys
from pathlib import Path

import torch
from prune_fixtures import ConvBNConv, calib_batches, conv1_group

from brainsurgeon.calib import capture_hessians, iter_batches, mixed_forwards
from brainsurgeon.config import CalibOptions
from brainsurgeon.prune import Stats, collect_stats
from brainsurgeon.prune.stats import _apoz_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from test_calib_lengths import _bert, _tokenized  # noqa: E402


def test_a_cnns_hessians_and_apoz_are_the_plain_loops_bit_for_bit():
    model, group = ConvBNConv(), conv1_group()
    stats = collect_stats(model, [group], ("hessians", "apoz"), calib_batches())
    zeros, rows = 0, 0

    def count(m, args):
        nonlocal zeros, rows
        z = (args[0].movedim(1, -1) == 0).reshape(-1, args[0].shape[1]).float()  # (positions, C)
        zeros, rows = zeros + z.sum(0), rows + z.shape[0]

    h = model.conv2.register_forward_pre_hook(count)
    with torch.no_grad(), capture_hessians(model, ["conv2"]) as hs:
        for args, kwargs in iter_batches(calib_batches()):
            model(*args, **kwargs)
    h.remove()
    assert list(stats.hessians) == ["conv2"] and torch.equal(stats.hessians["conv2"], hs["conv2"].H)
    assert torch.equal(stats.apoz["conv2"], zeros / rows) and 0 < float(stats.apoz["conv2"].mean()) < 1


def test_apoz_leaves_padding_tokens_out():
    bert = _bert()
    for layer in bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.ReLU()  # many exact zeros at the FFN output's input
    padded = _tokenized([9, 3, 6])
    alone = [{k: v[i:i + 1, :int(padded["attention_mask"][i].sum())] for k, v in padded.items()} for i in range(3)]
    name = "encoder.layer.1.output.dense"
    stats = {"padded": Stats(bert), "alone": Stats(bert)}
    _apoz_stats(bert, [name], [padded], 0, stats["padded"])
    _apoz_stats(bert, [name], alone, 0, stats["alone"])
    torch.testing.assert_close(stats["padded"].apoz[name], stats["alone"].apoz[name], rtol=0, atol=1e-7)
    assert 0 < float(stats["padded"].apoz[name].mean()) < 1


def test_hessians_and_apoz_from_a_one_shot_iterator():
    model, group = ConvBNConv(), conv1_group()
    want = collect_stats(model, [group], ("hessians", "apoz"), calib_batches())
    got = collect_stats(model, [group], ("hessians", "apoz"), iter(calib_batches()))
    assert torch.equal(got.hessians["conv2"], want.hessians["conv2"])
    assert torch.equal(got.apoz["conv2"], want.apoz["conv2"])


def test_prune_reports_what_the_feed_added_to_an_encoders_hessians():
    import brainsurgeon as bs

    bert, batch = _bert(), _tokenized([9, 3, 6])
    want = [f"pruning statistics: {n}" for n in mixed_forwards(_bert(), [batch], CalibOptions())]
    rep = bs.prune_(bert, bs.ChannelPruning(ratio=0.25, importance="obs", ignore=(r"pooler\..*",)),
                    example_inputs=batch, calib=[batch])
    added = [n for n in rep.notes if n.startswith("pruning statistics: ")]
    assert added == want and any("vocabulary" in n for n in added)
