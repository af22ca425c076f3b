"""share.hessian_sensitivity: the driver's calibration feed (options=), its notes logged, max_batches honoured."""

import dataclasses
import logging
import sys
from pathlib import Path

import pytest

from brainsurgeon.calib import run_layerwise
from brainsurgeon.config import CalibOptions
from brainsurgeon.share import hessian_sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from test_calib_lengths import _bert, _tokenized  # noqa: E402

NAMES = ["encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense"]
BATCHES = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]


def _driver_traces(model, batches, options):
    seen = {}
    run_layerwise(model, NAMES, batches, lambda n, m, H: seen.__setitem__(n, float(m.weight.shape[0] * H.trace())),
                  dataclasses.replace(options, mode="dense", hessian_dtype="float64"))
    return seen


def test_sensitivity_follows_the_options_and_logs_the_mix(caplog):
    bert = _bert()
    for opts in (CalibOptions(vocab_inputs=16), CalibOptions(vocab_inputs=0, short_prefixes=(2,))):
        with caplog.at_level(logging.INFO, logger="brainsurgeon.share.bits"):
            got = hessian_sensitivity(bert, BATCHES, NAMES, options=opts)
        assert got == pytest.approx(_driver_traces(bert, BATCHES, opts), rel=1e-9)
    assert "hessian_sensitivity: calibration length mix: the model is bidirectional" in caplog.text
    assert "hessian_sensitivity: calibration vocabulary: added 16 single-token inputs" in caplog.text


def test_max_batches_replaces_the_options_one():
    bert = _bert()
    opts = CalibOptions(vocab_inputs=0)
    one = hessian_sensitivity(bert, BATCHES, NAMES, max_batches=1, options=opts)
    assert one == hessian_sensitivity(bert, BATCHES, NAMES, options=dataclasses.replace(opts, max_batches=1))
    assert one == pytest.approx(_driver_traces(bert, BATCHES[:1], opts), rel=1e-9)
    assert one != pytest.approx(hessian_sensitivity(bert, BATCHES, NAMES, options=opts), rel=1e-3)
