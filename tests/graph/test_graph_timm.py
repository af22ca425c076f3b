"""timm blocks whose sizes live in module code, tiny random configs: attention that sizes its heads from the
input width (PVT-v2 ``Attention``, CoaT ``FactorAttnConvRelPosEnc``) and EvoNorm-S's ``groups``. Every group
verifies (none is left unpruned), heads go with the residual channels, the attributes follow."""

from __future__ import annotations

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.graph import DependencyGraph

pvt_v2 = pytest.importorskip("timm.models.pvt_v2")
coat = pytest.importorskip("timm.models.coat")
evo_norm = pytest.importorskip("timm.layers.evo_norm")


def _pvt() -> torch.nn.Module:
    torch.manual_seed(0)
    return pvt_v2.PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 4), sr_ratios=(2, 1),
                                             mlp_ratios=(2, 2), num_classes=5).eval()


def _coat() -> torch.nn.Module:
    torch.manual_seed(0)
    return coat.CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                     parallel_depth=1, num_heads=4, crpe_window={3: 2, 5: 2}, num_classes=5).eval()


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("build", [_pvt, _coat], ids=["pvt_v2", "coat"])
def test_prune_leaves_no_group_unpruned(build):
    m, x = build(), torch.rand(1, 3, 32, 32)
    p0 = _params(m)
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("head",)), example_inputs=x)
    assert not [n for n in rep.notes if "failed verification" in n]
    assert _params(m) < 0.6 * p0
    for mode in (m.eval, m.train):
        mode()
        with torch.no_grad():
            assert m(x).shape == (1, 5)


def test_pvt_residual_group_takes_the_attention_heads():
    m, x = _pvt(), torch.rand(1, 3, 32, 32)
    g = DependencyGraph(m, (x,), ignore=[m.head])
    attn = m.stages[1].blocks[0].attn
    grp = g.group(m.stages[1].downsample.proj, dim="out", idxs=range(8))   # = head 0 of the attention
    names = {s.name for s in grp.slices}
    assert {"stages.1.blocks.0.attn.q.weight", "stages.1.blocks.0.attn.kv.weight",
            "stages.1.blocks.0.attn.proj.weight"} <= names
    g.prune([grp])                                                     # verified, eval and train
    assert (attn.num_heads, attn.head_dim) == (3, 8)
    assert attn.num_heads * attn.head_dim == attn.q.weight.shape[0] == m.stages[1].downsample.proj.out_channels
    assert attn.kv.weight.shape[0] == 2 * attn.q.weight.shape[0]
    with torch.no_grad():
        assert m(x).shape == (1, 5)


@pytest.mark.parametrize("norm", ["EvoNorm2dS0a", "EvoNorm2dS1", "EvoNorm2dS2a"])
def test_evonorm_groups_follow_the_channels(norm):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), getattr(evo_norm, norm)(32, groups=4),
                            torch.nn.Conv2d(32, 8, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    g = DependencyGraph(m, (x,), ignore=[m[2]])
    (grp,) = [grp for grp in g.groups() if grp.root.name == "0.weight"]
    assert grp.n == 4                                                  # whole groups of 8 channels
    with torch.no_grad():   # groups are normalized on their own: dropping groups 1 and 3 == not reading them
        m[2].weight[:, 8:16] = 0
        m[2].weight[:, 24:32] = 0
        ref = m(x)
    g.prune([grp.select([1, 3])])
    assert m[1].groups == 2 and m[1].weight.numel() == 16
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


def test_levit_heads_split_follows_the_pruned_dims():
    """LeViT splits every head's qkv into [key_dim, key_dim, val_dim] by attribute: no group may fail (each
    failure cost a bisection of verification forwards), and the attributes match the weights."""
    levit = pytest.importorskip("timm.models.levit")
    torch.manual_seed(0)
    m = levit.Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3),
                    num_classes=5).eval()
    x, p0 = torch.rand(2, 3, 64, 64), _params(m)          # 2 images: the head's BatchNorm1d in train mode
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("head.linear",)), example_inputs=x)
    assert not [n for n in rep.notes if "failed verification" in n]
    assert _params(m) < 0.6 * p0
    for a in (m.stages[0].blocks[0].attn, m.stages[1].downsample.attn_downsample, m.stages[1].blocks[0].attn):
        kv = a.kv.linear.weight if hasattr(a, "kv") else a.qkv.linear.weight
        per_head = a.key_dim + a.val_dim + (0 if hasattr(a, "kv") else a.key_dim)
        assert kv.shape[0] == a.num_heads * per_head and a.val_attn_dim == a.num_heads * a.val_dim
    for mode in (m.eval, m.train):
        mode()
        with torch.no_grad():
            assert m(x).shape == (2, 5)


def _sam():
    sam = pytest.importorskip("timm.models.vision_transformer_sam")
    return sam.VisionTransformerSAM(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, window_size=2,
                                    global_attn_indexes=(1,), use_rel_pos=True, neck_chans=16, head_hidden_size=None,
                                    global_pool="avg", num_classes=5), "head.fc"


def _vit():
    vit = pytest.importorskip("timm.models.vision_transformer")
    return vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, qk_norm=True,
                                 num_classes=5), "head"


@pytest.mark.parametrize("build", [_sam, _vit], ids=["sam", "vit"])
def test_vit_heads_prune_and_the_head_count_follows(build):
    """timm ViT ``Attention`` (reshape by ``num_heads``/``head_dim``/``attn_dim``) and SAM's (``-1``)."""
    torch.manual_seed(0)
    m, head = build()
    m = m.eval()
    x, p0 = torch.rand(1, 3, 32, 32), _params(m)
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=(head,)), example_inputs=x)
    assert not [n for n in rep.notes if "failed verification" in n]
    assert _params(m) < 0.75 * p0
    for blk in m.blocks:
        a = blk.attn
        assert a.qkv.weight.shape[0] == 3 * a.num_heads * a.head_dim
        extra = a.rel_pos_h.shape[1] if hasattr(a, "rel_pos_h") else a.q_norm.weight.shape[0]
        assert extra == a.head_dim and getattr(a, "attn_dim", a.num_heads * a.head_dim) == a.num_heads * a.head_dim
    assert any(blk.attn.num_heads * blk.attn.head_dim < 32 for blk in m.blocks)   # attention was pruned
    with torch.no_grad():
        assert m(x).shape == (1, 5)
