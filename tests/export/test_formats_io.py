"""One entry point: bs.save(model, path, format=...) and bs.load(path) for every format."""

from __future__ import annotations

import os

import pytest
import torch
from serving_fixtures import compressed, logits

import brainsurgeon as bs
from brainsurgeon.errors import FormatError
from brainsurgeon.export import FORMATS, detect_format

pytest.importorskip("transformers")


@pytest.mark.parametrize("fmt,name,tol", [("brainsurgeon", "ckpt", 0.0), ("hf", "hf", 0.0),
                                          ("compressed-tensors", "ct", 1e-5), ("gptq", "gptq", 2e-3),
                                          ("gguf", "m.gguf", 2e-3)])
def test_every_format_round_trips_through_save_and_load(tmp_path, fmt, name, tol):
    if fmt == "gguf":
        pytest.importorskip("gguf")
    model, quant = compressed("w4g32")  # 4-bit, symmetric, groups of 32: every format can hold it
    ref = logits(model)
    opts = {} if fmt in ("brainsurgeon", "hf") else {"quant": quant}
    path = bs.save(model, str(tmp_path / name), format=fmt, **opts)
    assert detect_format(path) == fmt
    again = bs.load(path)
    assert (logits(again) - ref).abs().max() <= tol


def test_refused_before_anything_is_written(tmp_path):
    model, quant = compressed("w4g32")
    with pytest.raises(FormatError, match="allowed"):
        bs.save(model, str(tmp_path / "x"), format="safetensors")
    with pytest.raises(FormatError, match="cannot store recipe"):
        bs.save(model, str(tmp_path / "x"), history={"a": 1}, format="gptq", quant=quant)
    with pytest.raises(FormatError, match="example_inputs"):
        bs.save(model, str(tmp_path / "x.onnx"), format="onnx")
    for fmt in ("compressed-tensors", "gptq", "gguf"):  # a group size that does not divide 128 / 256
        with pytest.raises((FormatError, bs.ConfigError), match="does not divide"):
            bs.save(model, str(tmp_path / "x"), format=fmt, quant=bs.GPTQ(bits=4, group_size=48))
    assert os.listdir(tmp_path) == []
    assert set(FORMATS) == {"brainsurgeon", "hf", "compressed-tensors", "gptq", "gguf", "onnx"}


def test_plain_checkpoint_of_a_non_hf_model_needs_model_fn(tmp_path):
    from brainsurgeon.models import build_model

    m = build_model("digits-cnn")
    bs.save(m, str(tmp_path / "c"))
    with pytest.raises(FormatError, match="pass model_fn"):
        bs.load(str(tmp_path / "c"))
    again = bs.load(str(tmp_path / "c"), type(m))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again.eval()(x), m.eval()(x))
