"""The database's Hessians come from the driver's calibration feed, and its key holds that feed: entries built
under other CalibOptions (or by the old plain loop's feed) are recomputed, never silently reused."""

import logging
import sys
from pathlib import Path

import pytest
import torch
from search_fixtures import TinyNet, calib, small_space

from brainsurgeon.config import CalibOptions
from brainsurgeon.search import Database, build_database, database
from brainsurgeon.search.database import tensor_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from test_calib_lengths import _bert, _tokenized  # noqa: E402

ENTRIES = 24  # TinyNet x small_space: 3 layers x 8 variants
OTHER = "stored entries of this model were built from other calibration data or CalibOptions"


def test_other_calibration_options_are_recomputed_not_reused(tmp_path, caplog):
    model = TinyNet()
    assert build_database(model, small_space(), calib(), tmp_path).computed == ENTRIES
    assert build_database(model, small_space(), calib(), tmp_path, options=CalibOptions()).computed == 0
    with caplog.at_level(logging.INFO, logger="brainsurgeon.search.database"):
        off = build_database(model, small_space(), calib(), tmp_path, options=CalibOptions(vocab_inputs=0))
    assert off.computed == ENTRIES and f"{ENTRIES} {OTHER}" in caplog.text
    assert len(Database(tmp_path).entries) == 2 * ENTRIES  # both option sets kept, keyed apart
    for opts in (CalibOptions(), CalibOptions(vocab_inputs=0)):  # each finds its own entries again
        assert build_database(model, small_space(), calib(), tmp_path, options=opts).computed == 0
    # max_batches takes the first batches for everything (Hessians, losses, costs): another key
    assert build_database(model, small_space(), calib(), tmp_path, options=CalibOptions(max_batches=2)).computed \
        == ENTRIES


def test_a_manifest_of_the_old_feed_is_recomputed(tmp_path, monkeypatch, caplog):
    def old_hash(batches, options=None):  # the key before the feed: the batch tensors only
        return tensor_hash([t for args, kw in batches for t in [*args, *kw.values()]
                            if isinstance(t, torch.Tensor)], "calib")

    model = TinyNet()
    with monkeypatch.context() as m:
        m.setattr(database, "calib_hash", old_hash)
        assert build_database(model, small_space(), calib(), tmp_path).computed == ENTRIES
    with caplog.at_level(logging.INFO, logger="brainsurgeon.search.database"):
        assert build_database(model, small_space(), calib(), tmp_path).computed == ENTRIES
    assert f"{ENTRIES} {OTHER}" in caplog.text and "older calibration feed than v2" in caplog.text


def test_an_encoders_database_logs_the_mix_and_differs_from_the_unmixed_one(tmp_path, caplog):
    bert = _bert()
    batches = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    space = small_space(ignore=(r"(?!encoder\.layer\.1\.output\.dense).*",), nm=(), block_sparsities=(),
                        nm_bits=(), model_loss=False)
    with caplog.at_level(logging.INFO, logger="brainsurgeon.search.database"):
        mixed = build_database(bert, space, batches, tmp_path / "a", options=CalibOptions(vocab_inputs=20))
    assert "search database: calibration length mix: the model is bidirectional" in caplog.text
    off = CalibOptions(short_prefixes=(), vocab_inputs=0)
    plain = build_database(bert, space, batches, tmp_path / "b", options=off)
    name = "encoder.layer.1.output.dense"
    a, b = ({e.variant: e.loss for e in t.entries[name]} for t in (mixed, plain))
    assert a.keys() == b.keys() and all(a[v] != pytest.approx(b[v], rel=1e-3) for v in a if v != "dense")
