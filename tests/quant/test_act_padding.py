"""Activation statistics leave padding tokens out: on a padded BERT batch, the observers' ranges and the SmoothQuant /
equalization maxima equal those of the same samples fed one at a time without padding."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from brainsurgeon.config import ActQuant
from brainsurgeon.quant import insert_act_quant_
from brainsurgeon.quant.equalize import _observe as equalize_observe
from brainsurgeon.quant.smooth import _observe as smooth_observe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from test_calib_lengths import _bert, _tokenized  # noqa: E402

LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]


def _bert_and_data():
    padded = _tokenized([9, 3, 6])
    alone = [{k: v[i:i + 1, :int(padded["attention_mask"][i].sum())] for k, v in padded.items()} for i in range(3)]
    return _bert(), [padded], alone


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_observer_ranges_leave_padding_out(granularity):
    bert, padded, alone = _bert_and_data()
    scales = []
    for data in (padded, alone):
        m = copy.deepcopy(bert)
        insert_act_quant_(m, dict.fromkeys(LAYERS, ActQuant(bits=8, observer="minmax", granularity=granularity)), data)
        scales.append([m.get_submodule(n).input_quantizer.scale.clone() for n in LAYERS])
    for a, b in zip(*scales, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("observe", [smooth_observe, equalize_observe], ids=["smooth", "equalize"])
def test_smoothing_and_equalization_maxima_leave_padding_out(observe):
    bert, padded, alone = _bert_and_data()
    a, b = observe(bert, padded, 0)[1], observe(bert, alone, 0)[1]
    assert set(a) == set(b) and LAYERS[0] in a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)
