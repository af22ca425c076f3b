"""GPTQ(guard="auto") on the mixed-calibration path: held-out vocabulary singles (regime 3) are forwarded but
kept out of every H, and each guarded row is no worse than round-to-nearest on them; decoders are untouched."""

import pytest
import torch
from test_calib_lengths import SEP, _llama, _tokenized
from test_calib_lengths import _bert as _lengths_bert

import brainsurgeon as bs
from brainsurgeon.calib.lengths import mix_calibration
from brainsurgeon.calib.regimes import HELDOUT
from brainsurgeon.config import GUARD_SINGLES, CalibOptions
from brainsurgeon.obs.guard import heldout_error

CLS = 48
OPTS = {"vocab_inputs": 64, "blocks": "encoder.layer"}


def _bert():
    return _lengths_bert(vocab_size=1500)   # room for 64 vocabulary singles plus GUARD_SINGLES held-out ones


def _calib():
    return [_tokenized([9, 5, 12, 7], seed=s) for s in range(2)]


def _quantized(make, guard, **opts):
    model = make()
    head = r"pooler\.dense" if make is _bert else "lm_head"
    options = CalibOptions(**{**(OPTS if make is _bert else {}), **opts})
    rep = bs.quantize_(model, bs.GPTQ(bits=3, group_size=16, guard=guard), _calib(), ignore=[head], options=options)
    return model, rep.notes


def test_heldout_singles_are_disjoint_and_labelled_last():
    data, labels, _ = mix_calibration(_bert(), _calib(), CalibOptions(vocab_inputs=64, heldout_singles=100))
    ids = {r: {int(t) for b, lab in zip(data, labels, strict=True) if lab == r for t in b[1]["input_ids"][:, 1]}
           for r in (2, HELDOUT)}
    assert len(ids[2]) == 64 and len(ids[HELDOUT]) == 100 and not ids[2] & ids[HELDOUT]
    assert labels[-1] == HELDOUT and labels == sorted(labels)


def test_heldout_singles_stay_out_of_every_hessian():
    a, _ = _quantized(_bert, False)
    b, _ = _quantized(_bert, False, heldout_singles=GUARD_SINGLES)  # forwarded, share 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_guarded_layer_is_no_worse_than_rtn_on_the_heldout_inputs():
    model, notes = _quantized(_bert, "auto")
    assert any(n.startswith("GPTQ guard:") for n in notes)
    dense = _bert()
    name = "encoder.layer.0.attention.self.query"  # its inputs (the embeddings) do not depend on compression
    data, labels, _ = mix_calibration(dense, _calib(), CalibOptions(**OPTS, heldout_singles=GUARD_SINGLES))
    xs = []
    hook = dense.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 16)))
    with torch.no_grad():
        for (_, kw), lab in zip(data, labels, strict=True):
            if lab == HELDOUT:
                dense(**kw)
    hook.remove()
    X = torch.cat(xs)
    W = dense.get_submodule(name).weight.detach()
    W_g = model.get_submodule(name).weight.detach()
    W_r = bs.obs.compress_weight(W, None, bs.RTN(bits=3, group_size=16)).weight
    assert torch.all(heldout_error(W, W_g, X) <= heldout_error(W, W_r, X) * (1 + 1e-6) + 1e-12)
    off, _ = _quantized(_bert, False)
    assert not torch.equal(W_g, off.get_submodule(name).weight)  # the guard acted on this layer


def test_guard_leaves_a_causal_decoder_unchanged():
    auto, notes = _quantized(_llama, "auto")
    off, _ = _quantized(_llama, False)
    assert all(torch.equal(x, y) for x, y in zip(auto.state_dict().values(), off.state_dict().values(), strict=True))
    assert not any(n.startswith("GPTQ guard:") for n in notes)


def test_guard_is_validated_and_off_by_default():
    with pytest.raises(bs.ConfigError, match="guard"):
        bs.GPTQ(guard="on")
    assert bs.GPTQ().guard is False  # opt-in: it failed its held-out model check (bench/ood_diag.py (8))
    assert SEP == 49 and CLS == 48  # the fixture's [CLS]/[SEP]
