"""calib.vocab / calib.regimes: seeded vocabulary singles join an encoder's calibration, each kind of input
(samples, prefixes, vocabulary) with a fixed share of every Hessian's trace."""

import pytest
import torch
from test_calib_lengths import _bert
from test_calib_lengths import _tokenized as _padded

import brainsurgeon as bs
from brainsurgeon.calib import HessianAccumulator, run_layerwise
from brainsurgeon.calib.lengths import mix_calibration, short_prefixes
from brainsurgeon.calib.padding import batch_index
from brainsurgeon.calib.regimes import regime_shares
from brainsurgeon.calib.shrinkage import auto_shrinkage
from brainsurgeon.calib.vocab import special_ids, vocab_ids, vocab_singles
from brainsurgeon.config import CalibOptions
from brainsurgeon.errors import CalibrationError, ConfigError

CLS, SEP, V = 48, 49, 50
NAMES = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]


def _tokenized(lengths, seed=0):
    return _padded(lengths, seed, token_type=1)  # token types 1: the singles must copy a real sample's


def test_vocab_ids_are_seeded_distinct_and_skip_special_tokens():
    bert = _bert()  # BertConfig names pad_token_id = 0
    assert special_ids(bert, [CLS, SEP]) == {0, CLS, SEP}
    a = vocab_ids(bert, 20, seed=3, exclude=[CLS, SEP])
    assert a == vocab_ids(bert, 20, seed=3, exclude=[CLS, SEP]) and a != vocab_ids(bert, 20, seed=4, exclude=[CLS, SEP])
    assert len(a) == len(set(a)) == 20 and all(0 < i < V and i not in (CLS, SEP) for i in a)
    assert sorted(vocab_ids(bert, 1000, exclude=[CLS, SEP])) == [i for i in range(1, V) if i not in (CLS, SEP)]
    assert vocab_ids(torch.nn.Linear(2, 2), 5) == [] and vocab_ids(bert, 0) == []


def test_vocab_singles_keep_the_samples_start_end_and_per_token_values():
    s = [{"input_ids": torch.tensor([CLS, 7, 8, SEP]), "attention_mask": torch.ones(4, dtype=torch.long),
          "token_type_ids": torch.tensor([1, 1, 1, 1])}]
    out = vocab_singles(s, {"use_cache": False}, list(range(1, 301)), (1, 1))
    assert [tuple(kw["input_ids"].shape) for _, kw in out] == [(256, 3), (44, 3)]
    ids = torch.cat([kw["input_ids"] for _, kw in out])
    assert ids[:, 0].eq(CLS).all() and ids[:, 2].eq(SEP).all() and ids[:, 1].tolist() == list(range(1, 301))
    for _, kw in out:
        assert kw["use_cache"] is False and kw["attention_mask"].eq(1).all() and kw["token_type_ids"].eq(1).all()
    assert vocab_singles(s, {}, [5], (0, 0))[0][1]["input_ids"].tolist() == [[5]]  # no marks: the token alone


def test_mix_labels_each_batch_with_its_regime():
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    data, labels, notes = mix_calibration(bert, calib, CalibOptions(vocab_inputs=300))
    # 5 prefixes in 3 length groups; the 47 ids of the vocabulary less [PAD]/[CLS]/[SEP] in one batch of 45 + ...
    assert labels == [0, 0, 1, 1, 1, 2] and len(data) == 6
    assert tuple(data[5][1]["input_ids"].shape) == (V - 3, 3)
    assert any("added 47 single-token inputs" in n and "less 3 special" in n for n in notes)
    assert any("50% calibration samples, 25% short prefixes, 25% vocabulary singles" in n for n in notes)
    _, labels, notes = mix_calibration(bert, calib, CalibOptions(short_prefixes=(), vocab_inputs=8,
                                                                 regime_shares=(0.6, 0.3, 0.1)))
    assert labels == [0, 0, 2] and any("86% calibration samples, 14% vocabulary singles" in n for n in notes)
    _, labels, notes = mix_calibration(bert, calib, CalibOptions(regime_shares=()))
    assert labels == [0, 0, 1, 1, 1, 2]  # still labelled (calibration_mixed), but no shares: every row alike
    assert not any("calibration regimes" in n for n in notes)


def _reference(bert, parts, shares):
    """H by hooks: each regime's 2/n_r X_r^T X_r over its real tokens, combined with trace shares."""
    rows = {n: [[] for _ in parts] for n in NAMES}
    state = {}
    hooks = [bert.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: rows[n][state["r"]].append(a[0][state["mask"]].double())) for n in NAMES]
    with torch.no_grad():
        for r, batches in enumerate(parts):
            for b in batches:
                state["r"], state["mask"] = r, b["attention_mask"].bool()
                bert(**b)
    for h in hooks:
        h.remove()
    out = {}
    for n in NAMES:
        Xs = [torch.cat(x) for x in rows[n] if x]
        Hs = [2 * X.T @ X / len(X) for X in Xs]
        s = [shares[r] for r, x in enumerate(rows[n]) if x]
        scale = sum(len(X) * H.trace() for X, H in zip(Xs, Hs, strict=True)) / sum(len(X) for X in Xs) / sum(s)
        out[n] = scale * sum(si * H / H.trace() for si, H in zip(s, Hs, strict=True))
    return out


@pytest.mark.parametrize("mode", ["dense", "sequential", "blocks"])
def test_hessians_equal_the_hook_reference_with_the_shares(mode):
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    shares = (0.5, 0.2, 0.3)
    opts = CalibOptions(vocab_inputs=20, vocab_seed=5, regime_shares=shares,
                        **({"blocks": "encoder.layer"} if mode == "blocks" else {"mode": mode}))
    prefixes = [kw for _, kw in short_prefixes([((), b) for b in calib], (1, 2, 3, 4))]
    ids = vocab_ids(bert, 20, seed=5, exclude=[CLS, SEP])
    singles = {"input_ids": torch.tensor([[CLS, t, SEP] for t in ids]), "attention_mask": torch.ones(20, 3).long(),
               "token_type_ids": torch.ones(20, 3).long()}
    want = _reference(bert, [calib, prefixes, [singles]], shares)
    seen: dict = {}
    run_layerwise(bert, NAMES, calib, lambda n, m, H: seen.__setitem__(n, H.clone()), opts)
    for n in NAMES:
        torch.testing.assert_close(seen[n].double(), want[n], rtol=1e-5, atol=1e-6)


def test_off_is_the_calibration_as_given_and_no_shares_count_rows():
    bert = _bert()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    plain = _reference(bert, [calib], (1.0,))
    seen: dict = {}
    notes = run_layerwise(bert, NAMES, calib, lambda n, m, H: seen.__setitem__(n, H.clone()),
                          CalibOptions(mode="dense", short_prefixes=(), vocab_inputs=0))
    assert notes == []
    for n in NAMES:
        torch.testing.assert_close(seen[n].double(), plain[n], rtol=1e-5, atol=1e-6)
    # regime_shares=(): the vocabulary rows count like any other row (one regime, every row alike)
    ids = vocab_ids(bert, 6, exclude=[CLS, SEP])
    singles = {"input_ids": torch.tensor([[CLS, t, SEP] for t in ids]), "attention_mask": torch.ones(6, 3).long(),
               "token_type_ids": torch.ones(6, 3).long()}
    rows = _reference(bert, [calib + [singles]], (1.0,))
    run_layerwise(bert, NAMES, calib, lambda n, m, H: seen.__setitem__(n, H.clone()),
                  CalibOptions(mode="dense", short_prefixes=(), vocab_inputs=6, regime_shares=()))
    for n in NAMES:
        torch.testing.assert_close(seen[n].double(), rows[n], rtol=1e-5, atol=1e-6)


def test_quantize_is_seeded_and_the_vocabulary_changes_the_result():
    calib = [_tokenized([9, 3, 6, 12])]
    runs = []
    for vocab, seed in ((20, 0), (20, 0), (20, 1), (0, 0)):
        bert = _bert()
        rep = bs.quantize_(bert, bs.GPTQ(bits=4, group_size=16), calib, ignore=[r"pooler\..*"],
                           options=CalibOptions(blocks="encoder.layer", vocab_inputs=vocab, vocab_seed=seed))
        runs.append((bert.encoder.layer[0].attention.self.query.weight.clone(), rep.notes))
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    assert not torch.equal(runs[0][0], runs[3][0])
    assert sum("calibration vocabulary: added 20 single-token inputs" in n for n in runs[0][1]) == 1
    assert not any("calibration vocabulary" in n for n in runs[3][1])


def test_shrinkage_intensity_comes_from_the_calibration_samples_alone():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 2)
    xs = [torch.randn(4, 5, 6) for _ in range(3)]
    extra = torch.randn(8, 3, 6) * 5
    with auto_shrinkage(lambda name: True) as applied:
        ref = HessianAccumulator("fc", lin)
        for i, x in enumerate(xs):
            with batch_index(i):
                ref.add_input(x)
        H0 = ref.H
        acc = HessianAccumulator("fc", lin)
        with regime_shares([0, 0, 0, 2], (0.5, 0.25, 0.25)):
            for i, x in enumerate([*xs, extra]):
                with batch_index(i):
                    acc.add_input(x)
            H = acc.H
    lam = applied[0][1]
    assert applied[1] == ("fc", lam) and acc.shrinkage == lam and 0 < lam < 1
    X0 = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    X2 = extra.reshape(-1, 6).double()
    H_0, H_2 = 2 * X0.T @ X0 / len(X0), 2 * X2.T @ X2 / len(X2)
    scale = (len(X0) * H_0.trace() + len(X2) * H_2.trace()) / (len(X0) + len(X2)) / 0.75
    mix = scale * (0.5 * H_0 / H_0.trace() + 0.25 * H_2 / H_2.trace())
    want = (1 - lam) * mix + lam * torch.diag(mix.diagonal())
    torch.testing.assert_close(H.double(), want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(H0.double(), (1 - lam) * H_0 + lam * torch.diag(H_0.diagonal()), rtol=1e-6, atol=1e-8)


def test_a_regime_that_comes_back_is_refused():
    acc = HessianAccumulator("fc", torch.nn.Linear(3, 2))
    with regime_shares([0, 2, 0], (0.5, 0.25, 0.25)):
        for i in range(3):
            with batch_index(i):
                if i < 2:
                    acc.add_input(torch.randn(4, 3))
                else:
                    with pytest.raises(CalibrationError, match="regime by regime"):
                        acc.add_input(torch.randn(4, 3))


def test_options_validate_the_vocabulary_and_shares():
    for bad in ({"vocab_inputs": -1}, {"regime_shares": (0.5, 0.5)}, {"regime_shares": (0.0, 0.5, 0.5)},
                {"regime_shares": (0.5, float("nan"), 0.5)}, {"regime_shares": (0.5, -0.1, 0.5)}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CalibOptions(**bad)
    assert CalibOptions(regime_shares=[1, 0, 0]).regime_shares == (1, 0, 0)


def test_mixed_forwards_give_capture_hessians_the_drivers_hessians():
    from brainsurgeon.calib import capture_hessians, mixed_forwards

    bert = _bert().train()
    calib = [_tokenized([9, 3, 6]), _tokenized([2, 7, 10], seed=1)]
    opts = CalibOptions(mode="dense", vocab_inputs=20)
    with capture_hessians(bert, NAMES) as hs:
        notes = mixed_forwards(bert, calib, opts)
    assert all(m.training for m in bert.modules())  # flags given back
    seen: dict = {}
    assert run_layerwise(bert, NAMES, calib, lambda n, m, H: seen.__setitem__(n, H.clone()), opts) == notes
    for n in NAMES:
        torch.testing.assert_close(hs[n].H.float(), seen[n], rtol=1e-5, atol=1e-6)
