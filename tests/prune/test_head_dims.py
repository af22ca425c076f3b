"""Within-head dims: the same dims leave every head (q/k paired with v/o), zero-then-prune keeps outputs,
head_dim attributes follow, parameter counts are exact; GQA kv heads share their query heads' dims."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from brainsurgeon.errors import ConfigError
from brainsurgeon.graph import DependencyGraph
from brainsurgeon.graph.trace import run_model
from brainsurgeon.prune import ChannelPruning, head_dim_sets, pair_groups, prune_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "graph"))
from graph_fixtures import build  # noqa: E402

pytest.importorskip("transformers")


def _out(y: object) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


def _numel(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["TinyBERT", "TinyLlamaGQA"])
def test_zeroed_head_dims_prune_without_changing_outputs(name):
    model, x = build(name)
    m = copy.deepcopy(model)
    g = DependencyGraph(m, x)
    sets = head_dim_sets(g)
    assert sets
    chosen = []
    for groups in sets:
        joint, _ = pair_groups(groups, [torch.arange(grp.n, dtype=torch.float32) for grp in groups])
        chosen.append(joint.select([0]))
        assert joint.exact
    with torch.no_grad():
        for sel in chosen:
            for s in sel.slices:
                getattr(m.get_submodule(s.module), s.tensor).index_fill_(s.dim, s.idxs.reshape(-1), 0.0)
        y0 = _out(run_model(m, x))
    g.prune(chosen)
    with torch.no_grad():
        assert torch.allclose(_out(run_model(m, x)), y0, atol=1e-5)


def test_tiny_bert_head_dims_exact_counts_and_attributes():
    model, x = build("TinyBERT")           # hidden 16, 4 heads of 4, 2 layers
    rep = prune_(model, ChannelPruning(ratio=0.0, head_dim_ratio=0.5), x)
    att = model.encoder.layer[0].attention.self
    assert (att.attention_head_size, att.num_attention_heads, att.all_head_size) == (2, 4, 8)
    # per layer: q, k, v lose 8 rows (16 in + 1 bias each), output.dense loses 8 columns (16 out)
    assert rep.metrics["params"]["before"] - rep.metrics["params"]["after"] == 2 * (3 * 8 * 17 + 8 * 16)


def test_tiny_llama_gqa_head_dims_exact_counts_and_attributes():
    model, x = build("TinyLlamaGQA")       # hidden 16, 4 q heads / 2 kv heads of 4 dims, rotary pairs (d, d+2)
    before = _numel(model)
    prune_(model, ChannelPruning(ratio=0.0, head_dim_ratio=0.5), x)
    att = model.model.layers[1].self_attn
    assert att.head_dim == 2 and att.q_proj.out_features == 8 and att.k_proj.out_features == 4
    assert model.model.rotary_emb.inv_freq.shape == (1,)
    # per layer: q 8 rows, k and v 4 rows each (x16 inputs), o_proj 8 columns (x16 outputs)
    assert before - _numel(model) == 2 * ((8 + 4 + 4) * 16 + 8 * 16)


def test_mha_head_dims_shrink_embed_dim_in_every_head():
    model, x = build("MHA")
    embed, heads = model.attn.embed_dim, model.attn.num_heads
    prune_(model, ChannelPruning(ratio=0.0, head_dim_ratio=0.5), x)
    assert model.attn.num_heads == heads and model.attn.head_dim == embed // heads // 2


def test_head_dim_ratio_is_validated():
    with pytest.raises(ConfigError, match="head_dim_ratio"):
        ChannelPruning(head_dim_ratio=1.0)


def test_torchvision_vit_head_dims_follow_the_residual_stream():
    vit = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    model = vit.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
                                  num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    prune_(model, ChannelPruning(ratio=0.0, head_dim_ratio=0.5, ignore=("heads.head",)), x)
    att = model.encoder.layers[1].self_attention
    assert (att.num_heads, att.head_dim, att.embed_dim, model.hidden_dim) == (2, 2, 4, 4)
    assert model(x).shape == (2, 3)
