"""The output layer (classifier / lm_head): named in the report, kept dense with CalibOptions(keep_head=True)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.cli.main import main
from brainsurgeon.planning import output_layer

KEEP = bs.CalibOptions(keep_head=True)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _calib():
    return [torch.randn(8, 8, generator=torch.Generator().manual_seed(0))]


def test_default_compresses_the_head_and_names_it():
    m = _mlp()
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), _calib())
    assert [r.name for r in rep.rows] == ["0", "2", "4"]
    assert sum("4 (4, 16) is the model's output layer" in n and "keep_head=True" in n for n in rep.notes) == 1


@pytest.mark.parametrize("verb", ["sparsify", "quantize", "quantize_data_free"])
def test_keep_head_leaves_exactly_the_head_dense(verb):
    m = _mlp()
    head = m[4].weight.detach().clone()
    if verb == "sparsify":
        rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), _calib(), options=KEEP)
    elif verb == "quantize":
        rep = bs.quantize_(m, bs.GPTQ(bits=4), _calib(), options=KEEP)
    else:
        rep = bs.quantize_(m, bs.RTN(bits=4), options=KEEP)
    assert [r.name for r in rep.rows] == ["0", "2"] and torch.equal(m[4].weight, head)
    assert sum("4 (4, 16) is the model's output layer" in n and "kept dense" in n for n in rep.notes) == 1


def test_an_override_naming_the_head_compresses_it_and_a_recipe_can_keep_it():
    m = _mlp()
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), _calib(), overrides={"4": bs.SparseGPT(sparsity=0.25)},
                       options=KEEP)
    assert [r.name for r in rep.rows] == ["0", "2", "4"]
    assert float((m[4].weight == 0).float().mean()) == 0.25
    m = _mlp()
    recipe = "brainsurgeon_recipe: 1\nsteps:\n  - method: {type: RTN, bits: 4}\ncalib: {keep_head: true}\n"
    assert [r.name for r in bs.compress(m, recipe, _calib()).rows] == ["0", "2"]


def test_output_layer_of_real_shapes():
    tv = pytest.importorskip("torchvision")
    assert output_layer(tv.models.mobilenet_v2(weights=None)) == "classifier.1"
    assert output_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))) == ""  # a conv output: no head
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    llm = transformers.LlamaForCausalLM(cfg).eval()
    assert output_layer(llm) == "lm_head"
    rep = bs.quantize_(llm, bs.RTN(bits=4), options=KEEP)
    assert "lm_head" not in [r.name for r in rep.rows] and len(rep.rows) == 7
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=32))
    assert output_layer(bert) == ""  # the pooler is not a classifier


def test_dry_run_shows_the_kept_head(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("brainsurgeon_recipe: 1\nsteps:\n  - method: {type: RTN, bits: 4}\ncalib: {keep_head: true}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(r), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers: conv1, conv2, conv3, fc1\n" in out and "note: fc2 (10, 64) is the model's output layer" in out
