"""calib.mixed: every Hessian the library collects outside the driver (share.hessian_sensitivity, the search
database, prune.collect_stats) comes from the driver's feed: on a padded BERT it equals run_layerwise's
dense-mode H; on a CNN and a causal decoder (no mix there, no padding) it equals the old plain loop bit for bit."""

import dataclasses

import pytest
import torch
from test_calib_lengths import _bert, _llama, _tokenized
from torch import nn

from brainsurgeon.calib import capture_hessians, iter_batches, run_layerwise
from brainsurgeon.calib.mixed import FEED_VERSION, feed_key
from brainsurgeon.config import CalibOptions
from brainsurgeon.prune.importance import Stats
from brainsurgeon.prune.stats import _hessian_stats
from brainsurgeon.search.database import _hessians, calib_hash
from brainsurgeon.share import hessian_sensitivity

BERT = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense", "pooler.dense"]
LLAMA = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
CNN = ["0", "3"]


def _trace_sensitivity(model, Hs):
    """hessian_sensitivity's output for Hessians Hs: rows * tr(H)."""
    return {n: float(model.get_submodule(n).weight.shape[0] * H.diagonal().sum()) for n, H in Hs.items()}


def _sensitivity(model, calib, names, options):
    return hessian_sensitivity(model, calib, names, options=options)


def _database(model, calib, names, options):
    return _hessians(model, names, list(iter_batches(calib)), options)


def _pruning(model, calib, names, options):
    stats = Stats(model)
    _hessian_stats(model, names, calib, options, stats)
    return stats.hessians


COLLECTORS = {"share.hessian_sensitivity": _sensitivity, "search.database": _database, "prune.stats": _pruning}


def _driver(model, calib, names, options):
    seen = {}
    run_layerwise(model, names, calib, lambda n, m, H: seen.__setitem__(n, H.clone()),
                  dataclasses.replace(options, mode="dense", hessian_dtype="float64"))
    return seen


def _plain(model, calib, names):
    """What every collector did before: one forward per batch, every row."""
    with torch.no_grad(), capture_hessians(model, names) as hs:
        for args, kwargs in iter_batches(calib):
            model(*args, **kwargs)
        return {n: hs[n].H for n in names}


def _close(got, want, exact=False):
    assert set(got) == set(want)
    for n in want:
        if exact:
            assert got[n] == want[n] if isinstance(got[n], float) else torch.equal(got[n], want[n]), n
        elif isinstance(got[n], float):
            assert got[n] == pytest.approx(want[n], rel=1e-9), n
        else:
            torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12)


def _expected(kind, model, Hs):
    return _trace_sensitivity(model, Hs) if kind == "share.hessian_sensitivity" else Hs


@pytest.mark.parametrize("options", [CalibOptions(vocab_inputs=20), CalibOptions(short_prefixes=(), vocab_inputs=0)],
                         ids=["mix", "padding-only"])
@pytest.mark.parametrize("kind", list(COLLECTORS))
def test_each_collector_gets_the_drivers_dense_hessians_on_a_padded_encoder(kind, options):
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    want = _driver(bert, calib, BERT, options)
    _close(COLLECTORS[kind](bert, calib, BERT, options), _expected(kind, bert, want))
    # and that is not the plain loop's H (padding rows, no mix); the query's input is a LayerNorm's output, whose
    # rows all have the same norm at init: its trace (the sensitivity) cannot tell, the FFN output's can
    plain = _expected(kind, bert, _plain(bert, calib, BERT))
    got = COLLECTORS[kind](bert, calib, BERT, options)
    n = BERT[1]
    assert (got[n] != pytest.approx(plain[n], rel=1e-3)) if kind == "share.hessian_sensitivity" \
        else not torch.allclose(got[n], plain[n], rtol=1e-3)


@pytest.mark.parametrize("kind", list(COLLECTORS))
def test_without_the_mix_padding_is_all_that_changes(kind):
    """Mix off: H over padded batches = the plain loop's H over each sample alone, unpadded."""
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    alone = [{k: v[i:i + 1, :int(b["attention_mask"][i].sum())] for k, v in b.items()} for b in calib for i in range(3)]
    off = CalibOptions(short_prefixes=(), vocab_inputs=0)
    want = _expected(kind, bert, _plain(bert, alone, BERT))
    got = COLLECTORS[kind](bert, calib, BERT, off)
    for n in BERT:
        if kind == "share.hessian_sensitivity":
            assert got[n] == pytest.approx(want[n], rel=1e-5), n
        else:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.Flatten()).eval()


@pytest.mark.parametrize("kind", list(COLLECTORS))
@pytest.mark.parametrize("arch", ["cnn", "llama"])
def test_cnns_and_causal_decoders_are_bit_identical_to_the_plain_loop(kind, arch):
    if arch == "cnn":
        model, names = _cnn(), CNN
        g = torch.Generator().manual_seed(0)
        calib = [(torch.randn(4, 3, 6, 6, generator=g), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    else:
        model, names = _llama(), LLAMA
        ids = [(_tokenized([12, 12], seed=s)["input_ids"] % 40) for s in range(2)]
        calib = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    want = _expected(kind, model, _plain(model, calib, names))
    _close(COLLECTORS[kind](model, calib, names, CalibOptions()), want, exact=True)


def test_feed_key_names_every_option_that_changes_h():
    base = feed_key(CalibOptions())
    assert f'"feed": {FEED_VERSION}' in base
    for change in ({"short_prefixes": (1, 2)}, {"vocab_inputs": 7}, {"vocab_seed": 1}, {"regime_shares": ()},
                   {"max_batches": 2}):
        assert feed_key(CalibOptions(**change)) != base, change
    for same in ({"mode": "dense"}, {"keep_head": True}, {"hessian_dtype": "float64"}):  # no effect on the feed
        assert feed_key(CalibOptions(**same)) == base, same
    batches = list(iter_batches([torch.ones(2, 3)]))
    assert calib_hash(batches) == calib_hash(batches, CalibOptions()) != calib_hash(batches, CalibOptions(vocab_seed=1))
