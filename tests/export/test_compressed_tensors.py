"""compressed-tensors export: transformers (with compressed-tensors installed) loads it with our logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from serving_fixtures import IGNORE, compressed, logits, tiny_llama

import brainsurgeon as bs
from brainsurgeon.errors import FormatError
from brainsurgeon.export.compressed_tensors import (
    load_compressed_tensors,
    pack_int32,
    save_compressed_tensors,
    unpack_int32,
)

transformers = pytest.importorskip("transformers")
TOL = 1e-5  # float32 rounding of the grid scale (<= 1 ulp per weight) through two blocks


def _consumer(folder):
    pytest.importorskip("compressed_tensors")
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return m


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_matches_the_library(bits):
    """Our int32 bit stream is the one compressed-tensors' own pack_to_int32 writes, for every width."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (6, 70), generator=g)
    ours = pack_int32(q, bits)
    theirs = ct.pack_to_int32((q - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, 70), q)


@pytest.mark.parametrize("kind,fmt", [("w4g128", "pack-quantized"), ("w8", "pack-quantized"),
                                      ("w8", "int-quantized"), ("2:4", "pack-quantized"),
                                      ("2:4+w4g128", "pack-quantized"), ("o4g32", "pack-quantized"),
                                      ("r3g64", "pack-quantized")])
def test_consumer_loads_with_our_logits(tmp_path, kind, fmt):
    model, quant = compressed(kind)
    ref = logits(model)
    d = str(tmp_path / "ct")
    save_compressed_tensors(model, d, quant=quant, fmt=fmt)
    cfg = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    if quant is not None:
        w = next(iter(cfg["config_groups"].values()))["weights"]
        assert (w["num_bits"], w["type"], w["symmetric"]) == (quant.bits, "int", True)
        assert {g["weights"]["strategy"] for g in cfg["config_groups"].values()} <= {"group", "channel"}
        assert cfg["format"] == fmt and "lm_head" in cfg["ignore"]
    if kind.startswith("2:4"):
        assert cfg["sparsity_config"]["sparsity_structure"] == "2:4"
        assert cfg["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    consumer = _consumer(d)
    assert (logits(consumer) - ref).abs().max() < TOL
    ours = load_compressed_tensors(d)
    assert (logits(ours) - ref).abs().max() < TOL
    again = bs.load(d)  # the format is detected from config.json
    assert (logits(again) - ref).abs().max() < TOL


def test_packed_model_writes_its_own_codes(tmp_path):
    """A pack_-ed model's buffers are written as they are (no quant= needed): same codes, same logits."""
    model, quant = compressed("w4g128")
    bs.pack_(model, bs.Pack(bits=4, group_size=128, compute_dtype="float32"), ignore=IGNORE)
    ref = logits(model)
    save_compressed_tensors(model, str(tmp_path / "ct"))
    assert (logits(_consumer(str(tmp_path / "ct"))) - ref).abs().max() < TOL


def test_the_grid_is_checked_before_writing(tmp_path):
    """A float model that is not on the named grid is refused, and nothing is written."""
    model = tiny_llama()
    with pytest.raises(FormatError, match="not on a 4-bit grid"):
        save_compressed_tensors(model, str(tmp_path / "ct"), quant=bs.GPTQ(bits=4, group_size=128))
    model, quant = compressed("w4g128")
    with pytest.raises(bs.ConfigError, match="does not divide"):
        save_compressed_tensors(model, str(tmp_path / "ct"), quant=bs.GPTQ(bits=4, group_size=96))
    assert not os.path.exists(tmp_path / "ct")


def test_refusals_name_the_fix(tmp_path):
    model, quant = compressed("w4g64a")
    with pytest.raises(FormatError, match="asymmetric.*sym=True"):
        save_compressed_tensors(model, str(tmp_path / "ct"), quant=quant)
    model, quant = compressed("w4g128")
    with pytest.raises(FormatError, match="int-quantized stores 8-bit"):
        save_compressed_tensors(model, str(tmp_path / "ct"), quant=quant, fmt="int-quantized")
    narrowed = tiny_llama()
    lin = narrowed.model.layers[0].mlp.up_proj
    narrowed.model.layers[0].mlp.up_proj = torch.nn.Linear(lin.in_features, 200, bias=False)
    with pytest.raises(FormatError, match="cannot be expressed by an HF config"):
        save_compressed_tensors(narrowed, str(tmp_path / "ct"))
    assert not os.path.exists(tmp_path / "ct")
