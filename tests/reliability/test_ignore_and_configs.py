"""Bugs 13.#5 (ignore= in every verb) and 13.#10 (config and recipe type checks)."""

from collections import OrderedDict

import pytest
import torch
from reliability_state import assert_untouched, capture
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import ConfigError
from brainsurgeon.quant import pack_


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 16), act2=nn.ReLU(),
                                     fc3=nn.Linear(16, 8)))


def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 16, generator=g) for _ in range(2)]


VERBS = {
    "sparsify_": lambda m, ign: bs.sparsify_(m, bs.Magnitude(sparsity=0.5), calib(), ignore=ign),
    "quantize_": lambda m, ign: bs.quantize_(m, bs.RTN(bits=4), calib(), ignore=ign),
    "factorize_": lambda m, ign: bs.factorize_(m, bs.LowRank(rank=2), ignore=ign),
    "share_": lambda m, ign: bs.share_(m, bs.WeightSharing(bits=2), ignore=ign),
    "pack_": lambda m, ign: pack_(m, bs.Pack(bits=8, group_size=0, rtn=True), ignore=ign),
    "compress": lambda m, ign: bs.compress(m, bs.Recipe((bs.config.Step(bs.RTN(bits=4), ign),)), calib()),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_plain_string_ignore_is_one_pattern(verb):
    m = mlp()
    w = m.fc1.weight.detach().clone()
    VERBS[verb](m, "fc1")
    assert type(m.fc1) is nn.Linear and torch.equal(m.fc1.weight, w), f"{verb} changed the ignored layer"
    assert type(m.fc2) is not nn.Linear or not torch.equal(m.fc2.weight, mlp().fc2.weight)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_an_ignore_typo_is_a_config_error_listing_the_candidates(verb):
    m = mlp()
    before = capture(m)
    with pytest.raises(ConfigError, match=r"ignore pattern 'fc4' matches no module.*did you mean.*'fc1'.*"
                                          r"candidates: \['fc1', 'fc2', 'fc3'\]"):
        VERBS[verb](m, ["fc4"])
    assert_untouched(m, before)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_an_invalid_ignore_regex_is_a_config_error(verb):
    m = mlp()
    before = capture(m)
    with pytest.raises(ConfigError, match=r"ignore pattern '\[fc' is not a valid regular expression"):
        VERBS[verb](m, ["[fc"])
    with pytest.raises(ConfigError, match=r"ignore: every pattern must be a string.*got 3"):
        VERBS[verb](m, [3])
    assert_untouched(m, before)


@pytest.mark.parametrize("make, field, text", [
    (lambda: bs.ExactOBS(sparsity=0.5, damp="0.01"), "damp", "must be a number"),
    (lambda: bs.ExactOBS(sparsity=0.5, lazy=2.5), "lazy", "must be an integer"),
    (lambda: bs.ExactOBS(sparsity=0.5, lazy="64"), "lazy", "must be an integer"),
    (lambda: bs.SparseGPT(sparsity=0.5, blocksize=None), "blocksize", "must be an integer"),
    (lambda: bs.GPTQ(blocksize=None), "blocksize", "must be an integer"),
    (lambda: bs.CalibOptions(max_batches="2"), "max_batches", "must be an integer"),
    (lambda: bs.ExactOBS(pattern=4), "pattern", "must be a string"),
    (lambda: bs.RTN(bits=4, sym="no"), "sym", "must be a bool"),
    (lambda: bs.OBQ(bits=True), "bits", "must be an integer"),
    (lambda: bs.LowRank(rank="8"), "rank", "must be a positive integer"),
    (lambda: bs.WeightSharing(bits=None), "bits", "must be an integer"),
    (lambda: bs.Pack(bits="4"), "bits", "must be an integer"),
    (lambda: bs.ChannelPruning(ratio="0.5"), "ratio", r"must be in \[0, 1\)"),
    (lambda: bs.ChannelPruning(ratio=0.5, ignore=3), "ignore", "ignore"),
])
def test_every_wrongly_typed_config_field_is_a_config_error(make, field, text):
    with pytest.raises(ConfigError, match=rf"{field}.*{text}|{text}.*{field}"):
        make()


def test_lists_from_yaml_become_tuples_and_numpy_scalars_python_ones():
    import numpy as np

    assert bs.ChannelPruning(ratio=0.5, ignore=["fc"]).ignore == ("fc",)
    cfg = bs.RTN(bits=np.int64(4))
    assert type(cfg.bits) is int and cfg == bs.RTN(bits=4)


def _recipe(tmp_path, body):
    p = tmp_path / "r.yaml"
    p.write_text("brainsurgeon_recipe: 1\n" + body)
    return str(p)


@pytest.mark.parametrize("body, text", [
    ("steps:\n  - method: {type: ExactOBS, sparsity: 0.5}\n    overrides: [{match: fc1}]\n",
     r"override 0: must be a mapping with exactly the keys 'match'.*'method'"),
    ("steps:\n  - method: {type: RTN}\n    overrides: {fc1: {type: RTN, bits: 8}}\n",
     r"overrides must be a list"),
    ("steps:\n  - method: {type: RTN}\n    ignore: ['[fc']\n", r"ignore pattern '\[fc' is not a valid regular"),
    ("steps:\n  - method: {type: RTN}\n    overrides: [{match: '(fc', method: {type: RTN, bits: 8}}]\n",
     r"overrides pattern '\(fc' is not a valid regular"),
    ("steps:\n  - method: {type: RTN}\n    ignore: 3\n", r"ignore must be a module-name regex or a list"),
    ("steps:\n  - method: {type: ExactOBS, pattern: 4}\n", r"ExactOBS.pattern must be a string"),
    ("steps:\n  - method: {type: ExactOBS, sparsity: 0.5, damp: '0.01'}\n", r"ExactOBS.damp must be a number"),
    ("steps: {method: {type: RTN}}\n", r"'steps' must be a list"),
    ("steps:\n  - method: {type: RTN}\ncalib: [1]\n", r"'calib' must be a mapping"),
    ("steps:\n  - method: {type: RTN}\ncalib: {max_batches: '2'}\n", r"CalibOptions.max_batches must be an integer"),
])
def test_bad_recipes_are_config_errors(tmp_path, body, text):
    with pytest.raises(ConfigError, match=text):
        bs.load_recipe(_recipe(tmp_path, body))


def test_recipe_files_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file 'missing\.yaml' not found"):
        bs.load_recipe("missing.yaml")
    with pytest.raises(ConfigError, match="is a directory; pass the YAML file inside it"):
        bs.load_recipe(str(tmp_path))
    p = tmp_path / "latin1.yaml"
    p.write_bytes("brainsurgeon_recipe: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        bs.load_recipe(str(p))
    with pytest.raises(ConfigError, match="expected a YAML file path or YAML text"):
        bs.load_recipe(3)


# ----------------------------------------------------------------- 13.#4 tied and shared weights


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body, self.head = nn.Embedding(32, 16), nn.Linear(16, 16), nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_head_tied_to_the_embedding_is_left_unchanged_with_a_note():
    m = TiedEmbedding()
    emb = m.embed.weight.detach().clone()
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), [torch.randint(0, 32, (4, 8)) for _ in range(2)])
    assert torch.equal(m.embed.weight, emb) and m.head.weight is m.embed.weight
    assert [r.name for r in rep.rows] == ["body"]
    assert any("head.weight is tied to embed.weight (Embedding)" in n and "untie it" in n for n in rep.notes)


def test_a_weight_shared_by_two_linears_is_solved_once():
    m = SharedLinear()
    rep = bs.quantize_(m, bs.GPTQ(bits=2), [torch.randn(16, 16) for _ in range(2)])
    assert [r.name for r in rep.rows] == ["a"] and m.b.weight is m.a.weight
    assert any("a.weight is the same tensor as b.weight" in n and "solved once" in n for n in rep.notes)
    assert rep.rows[0].levels <= 4  # solved once: still on one 2-bit grid per row


def test_tiny_llama_with_tied_embeddings_keeps_its_embedding():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    llm = transformers.LlamaForCausalLM(cfg).eval()
    emb = llm.model.embed_tokens.weight.detach().clone()
    rep = bs.sparsify_(llm, bs.SparseGPT(sparsity=0.5), [torch.randint(0, 64, (2, 8)) for _ in range(2)])
    assert torch.equal(llm.model.embed_tokens.weight, emb)
    assert "lm_head" not in [r.name for r in rep.rows] and any("lm_head.weight is tied" in n for n in rep.notes)
