"""Block mode (CalibOptions(blocks=...)) compresses the layers outside the blocks in a final per-layer pass."""

from __future__ import annotations

import pytest
import torch

import brainsurgeon as bs


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def test_bert_pooler_is_compressed_after_the_blocks_with_a_note():
    m = _bert()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 50, (2, 8), generator=g)} for _ in range(2)]
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), calib, options=bs.CalibOptions(blocks="encoder.layer"))
    names = [r.name for r in rep.rows]
    assert len(names) == 2 * 6 + 1 and names[-1] == "pooler.dense"  # 6 Linears per block, then the pooler
    assert float((m.pooler.dense.weight == 0).float().mean()) == 0.5
    assert sum("outside the blocks 'encoder.layer' (pooler.dense) compressed in a final per-layer pass" in n
               for n in rep.notes) == 1


def test_ignoring_the_outside_layer_still_works_and_adds_no_note():
    m = _bert()
    w = m.pooler.dense.weight.detach().clone()
    calib = [{"input_ids": torch.randint(0, 50, (2, 8))}]
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5), calib, ignore=["pooler.dense"],
                       options=bs.CalibOptions(blocks="encoder.layer"))
    assert len(rep.rows) == 12 and torch.equal(m.pooler.dense.weight, w)
    assert not any("outside the blocks" in n for n in rep.notes)
