"""GPTQ(decouple="auto"): the massive-activation columns are decoupled on encoders (bidirectional, calibration
mixed by calib.lengths) and never on causal decoders, whose massive channels need the error feedback."""

import pytest
import torch
from test_calib_lengths import _bert, _llama, _tokenized

import brainsurgeon as bs
from brainsurgeon.config import DECOUPLE_AUTO


def _massive(model, dim=3):
    with torch.no_grad():  # one embedding channel 100x: after the first norm it dominates H's diagonal
        model.get_input_embeddings().weight[:, dim] *= 100.0
    return model


def _quantized(make, decouple):
    model = _massive(make())
    head = r"pooler\.dense" if make is _bert else "lm_head"
    calib = [_tokenized([9, 5, 12, 7], seed=s) for s in range(2)]
    rep = bs.quantize_(model, bs.GPTQ(bits=4, group_size=16, decouple=decouple), calib, ignore=[head])
    return {k: v.clone() for k, v in model.state_dict().items()}, rep.notes


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_auto_decouples_on_an_encoder():
    auto, notes = _quantized(_bert, "auto")
    fixed, _ = _quantized(_bert, DECOUPLE_AUTO)
    off, _ = _quantized(_bert, 0)
    assert _same(auto, fixed) and not _same(auto, off)
    assert any(n.startswith("GPTQ decouple:") for n in notes)


def test_auto_leaves_a_causal_decoder_coupled():
    auto, notes = _quantized(_llama, "auto")
    fixed, _ = _quantized(_llama, DECOUPLE_AUTO)
    off, _ = _quantized(_llama, 0)
    assert _same(auto, off) and not _same(auto, fixed)
    assert not any(n.startswith("GPTQ decouple:") for n in notes)


def test_decouple_is_validated():
    with pytest.raises(bs.ConfigError, match="decouple"):
        bs.GPTQ(decouple="on")
    with pytest.raises(bs.ConfigError, match="decouple"):
        bs.GPTQ(decouple=0.5)
