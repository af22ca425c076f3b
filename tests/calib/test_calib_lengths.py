"""calib.lengths: short prefixes of an encoder's token samples join its calibration; causal models get none."""

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.calib import run_layerwise
from brainsurgeon.calib.lengths import is_causal, mix_lengths, short_prefixes, token_batch
from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import ConfigError

CLS, SEP = 48, 49


def _bert(vocab_size: int = 50):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokenized(lengths, seed=0, token_type=0):
    """A tokenizer's right-padded batch: [CLS] content [SEP] [PAD]..., token types, mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 2
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n + 2] = torch.cat([torch.tensor([CLS]), torch.randint(1, 40, (n,), generator=g), torch.tensor([SEP])])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.full_like(ids, token_type)}


def test_one_prefix_per_sample_with_its_end_tokens_unpadded():
    b1, b2 = _tokenized([9, 3, 6]), _tokenized([2, 7], seed=1)
    out = short_prefixes([((), {**b1, "use_cache": False}), ((), b2)], (1, 2, 3, 4))
    # samples 0..4 take 1, 2, 3, 4, 1 content tokens; sample 3 (2 tokens) is not longer than 4: left out
    assert [tuple(kw["input_ids"].shape) for _, kw in out] == [(2, 3), (1, 4), (1, 5)]  # one unpadded batch a length
    for _, kw in out:
        assert kw["use_cache"] is False and torch.equal(kw["attention_mask"], torch.ones_like(kw["input_ids"]))
        assert torch.equal(kw["token_type_ids"], torch.zeros_like(kw["input_ids"]))
    i1, i2 = b1["input_ids"], b2["input_ids"]
    assert out[0][1]["input_ids"].tolist() == [[CLS, int(i1[0, 1]), SEP], [CLS, int(i2[1, 1]), SEP]]  # samples 0, 4
    assert out[1][1]["input_ids"].tolist() == [[CLS, *i1[1, 1:3].tolist(), SEP]]
    assert out[2][1]["input_ids"].tolist() == [[CLS, *i1[2, 1:4].tolist(), SEP]]


def test_left_padding_and_samples_without_common_end_tokens():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    out = short_prefixes([((), {"input_ids": ids, "attention_mask": (ids != 0).long()})], (2,))
    # no token is common to every sample's start or end: plain prefixes of the real tokens
    assert [kw["input_ids"].tolist() for _, kw in out] == [[[5, 6], [8, 9]]]
    with pytest.raises(ValueError, match="lengths must be positive"):
        short_prefixes([((), {"input_ids": ids})], (0,))


def test_token_batch_accepts_tokenizer_dicts_only():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert token_batch(((), {"input_ids": ids, "attention_mask": ids, "use_cache": False}))
    assert not token_batch(((ids,), {}))  # positional
    assert not token_batch(((), {"input_ids": ids.float()}))  # features, not token ids
    assert not token_batch(((), {"input_ids": ids, "pixel_values": torch.ones(2, 3, 4, 4)}))  # not per token


def test_probe_tells_encoders_from_decoders():
    b = _tokenized([12, 5])
    assert is_causal(_bert(), ((), b)) is False
    llm = _llama().train()  # in training mode: the probe runs in eval mode (no dropout) and gives the mode back
    llm.config.attention_dropout = 0.5
    for layer in llm.model.layers:
        layer.self_attn.attention_dropout = 0.5
    assert is_causal(llm, ((), {"input_ids": b["input_ids"][:, :-1] % 40, "use_cache": False})) is True
    assert all(m.training for m in llm.modules())
    assert is_causal(Pooled(), ((), b)) is None  # no (1, T, ...) output to compare
    assert is_causal(torch.nn.Linear(2, 2), ((), b)) is None  # the probe forward fails


class Pooled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.emb(input_ids).mean(1)


def test_encoder_hessians_get_the_prefix_rows_and_no_padding():
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    extra = short_prefixes([((), b) for b in calib], (1, 2, 3, 4))
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    rows = {n: [] for n in names}
    state = {}
    hooks = [bert.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: rows[n].append(a[0][state["mask"]].double())) for n in names]
    with torch.no_grad():
        for b in calib + [kw for _, kw in extra]:
            state["mask"] = b["attention_mask"].bool()
            bert(**b)
    for h in hooks:
        h.remove()
    want = {n: (lambda X: 2 * X.T @ X / len(X))(torch.cat(r)) for n, r in rows.items()}
    assert len(torch.cat(rows[names[0]])) == (9 + 3 + 6 + 2 + 7 + 10 + 6 * 2) + (3 + 4 + 5 + 3 + 4)
    plain = {"vocab_inputs": 0, "regime_shares": ()}  # every row alike (the shares: test_calib_vocab.py)
    for options in (CalibOptions(mode="dense", **plain), CalibOptions(blocks="encoder.layer", **plain)):
        seen: dict = {}
        notes = run_layerwise(bert, names, calib, lambda n, m, H, seen=seen: seen.__setitem__(n, H.clone()), options)
        assert [n for n in notes if "added 5 short prefixes" in n and "start and end token kept" in n] != []
        for n in names:
            torch.testing.assert_close(seen[n].double(), want[n], rtol=1e-5, atol=1e-6)


def test_max_batches_limits_the_samples_that_get_prefixes():
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    mixed, notes = mix_lengths(bert, iter(calib), CalibOptions(max_batches=1, vocab_inputs=0))
    assert [tuple(kw["input_ids"].shape) for _, kw in mixed] == [(3, 11), (1, 3), (1, 4), (1, 5)]
    assert "added 3 short prefixes" in notes[0]


def test_causal_models_and_other_data_are_left_as_they_are():
    llm = _llama()
    calib = [{"input_ids": torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)),
              "use_cache": False}]
    same, notes = mix_lengths(llm, calib, CalibOptions())
    assert same is calib and len(notes) == 1 and "the model is causal" in notes[0]
    x = [torch.randn(4, 8)]
    assert mix_lengths(torch.nn.Linear(8, 2), x, CalibOptions()) == (x, [])  # not token data: no note
    assert mix_lengths(_bert(), calib, CalibOptions(short_prefixes=(), vocab_inputs=0)) == (calib, [])  # off


def test_quantize_is_unchanged_on_a_causal_decoder():
    """The length mix is a no-op for causal models: GPTQ gives the same weights with it on and off."""
    calib = [{"input_ids": torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1)),
              "use_cache": False}]
    runs = []
    for prefixes, vocab in (((1, 2, 3, 4), 1024), ((), 0)):
        llm = _llama()
        rep = bs.quantize_(llm, bs.GPTQ(bits=4, group_size=16), calib,
                           options=CalibOptions(blocks="model.layers", short_prefixes=prefixes, vocab_inputs=vocab))
        runs.append(({k: v.clone() for k, v in llm.state_dict().items()}, rep.notes))
    (a, notes_on), (b, notes_off) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum("the model is causal" in n for n in notes_on) == 1 and not any("length mix" in n for n in notes_off)


def test_quantize_notes_the_prefixes_once_for_an_encoder():
    bert = _bert()
    rep = bs.quantize_(bert, bs.GPTQ(bits=4, group_size=16), [_tokenized([9, 3, 6, 12])],
                       options=CalibOptions(blocks="encoder.layer"))  # the pooler runs in a second pass
    assert sum("calibration length mix" in n for n in rep.notes) == 1
    assert any("added 4 short prefixes" in n for n in rep.notes)


def test_options_refuse_nonpositive_lengths():
    with pytest.raises(ConfigError, match="short_prefixes"):
        CalibOptions(short_prefixes=(0, 2))
    assert CalibOptions(short_prefixes=[1, 2]).short_prefixes == (1, 2)
