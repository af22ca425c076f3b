"""torchvision Swin / Swin-V2 (tiny random configs): heads prune with the stage's residual channels, the
relative-position bias follows the heads, verification passes in eval and train mode, counts are exact."""

from __future__ import annotations

import pytest
import torch
from graph_fixtures import zero_slices_

from brainsurgeon.graph import DependencyGraph

swin = pytest.importorskip("torchvision.models.swin_transformer")


def _tiny(v2: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=12, depths=[2, 2], num_heads=[3, 4],
                                window_size=[4, 4], num_classes=5, **extra).eval()


def _numel(m: torch.nn.Module) -> int:
    return sum(t.numel() for t in [*m.parameters(), *m.buffers()])


def _expected_numel(m: torch.nn.Module, groups: list) -> int:
    """Elements left when every slice of ``groups`` is removed (a tensor cut on two dims counted once)."""
    cut: dict[str, dict[int, int]] = {}
    for grp in groups:
        for s in grp.slices:
            cut.setdefault(s.name, {}).setdefault(s.dim, 0)
            cut[s.name][s.dim] += s.idxs.numel()
    total = 0
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        kept = [n - cut.get(name, {}).get(d, 0) for d, n in enumerate(t.shape)]
        total += int(torch.tensor(kept).prod()) if kept else 1
    return total


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["swin", "swin_v2"])
def test_swin_heads_prune_with_residual_channels(v2):
    m, x = _tiny(v2), torch.randn(1, 3, 32, 32)          # stage 1: 8x8 tokens, shifted 4x4 windows
    g = DependencyGraph(m, (x,), ignore=[m.head])
    groups = g.groups()
    attn = [grp for grp in groups if any(s.name.endswith("attn.qkv.weight") and s.dim == 0 for s in grp.slices)]
    assert len(attn) == 2                                   # one per stage: heads x residual channels
    for grp in attn:
        names = {s.name for s in grp.slices}
        per_head = ["attn.logit_scale", "attn.cpb_mlp.2.weight"] if v2 else ["attn.relative_position_bias_table"]
        assert all(any(n.endswith(p) for n in names) for p in per_head)   # the per-head bias follows the heads
        assert any(n.endswith("attn.proj.weight") for n in names)
    chosen = [grp.select([0]) for grp in groups]
    want = _expected_numel(m, chosen)
    g.prune(chosen)                                         # verified in eval and train mode
    assert _numel(m) == want
    heads = [blk.attn.num_heads for stage in (m.features[1], m.features[3]) for blk in stage]
    assert heads == [2, 2, 3, 3]
    qkv = m.features[3][0].attn.qkv.weight
    assert qkv.shape[0] == 3 * qkv.shape[1]                 # head_dim = C // num_heads kept
    with torch.no_grad():
        assert m(x).shape == (1, 5)
        m.train()
        m(x)


def test_swin_mlp_hidden_is_exact():
    model, x = _tiny(False), torch.randn(1, 3, 32, 32)
    g = DependencyGraph(model, (x,), ignore=[model.head])
    grp = g.group("features.1.0.mlp.0", "out", [1, 3, 5])
    assert grp.exact
    zero_slices_(model, grp)
    with torch.no_grad():
        y0 = model(x)
    grp.prune()
    with torch.no_grad():
        assert torch.allclose(model(x), y0, atol=1e-5)


