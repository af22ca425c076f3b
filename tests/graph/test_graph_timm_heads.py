"""timm attention blocks that size their heads from the input width (``C // num_heads`` ... ``reshape(B, N, C)``)
or keep ``num_heads``/``head_dim`` in attributes (issue 14 #6: they were left unpruned, e.g. BEiT 33 %, CaiT 32 %):
every group verifies, heads go with the residual width, ``num_heads`` follows, and the model runs in both modes."""

from __future__ import annotations

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.graph import DependencyGraph

timm_models = pytest.importorskip("timm.models")
from timm.layers.attention import AttentionRope  # noqa: E402
from timm.models import beit, cait, convit, davit, metaformer, twins, xcit  # noqa: E402
from timm.models import swin_transformer_v2 as swin2  # noqa: E402
from timm.models import swin_transformer_v2_cr as swin2_cr  # noqa: E402

BUILD = {
    "cait": lambda: cait.Cait(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, depth_token_only=1,
                              num_classes=5),           # talking heads + class attention
    "beit": lambda: beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=5,
                              use_rel_pos_bias=True),   # q/v biases, per-head relative position table
    "xcit": lambda: xcit.Xcit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1,
                              num_classes=5),           # cross-covariance attention, per-head temperature
    "twins": lambda: twins.Twins(img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(2, 4), depths=(1, 1),
                                 sr_ratios=(2, 1), mlp_ratios=(2, 2), wss=(2, 2), num_classes=5),   # sub-sampling conv
    "davit": lambda: davit.DaVit(depths=(1, 1), embed_dims=(16, 32), num_heads=(2, 4), window_size=2, num_classes=5),
    "convit": lambda: convit.ConVit(img_size=32, patch_size=8, embed_dim=32, depth=2, local_up_to_layer=1,
                                    num_heads=4, num_classes=5),   # gated positional attention (GPSA) + MHSA
    "swinv2": lambda: swin2.SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                              num_heads=(2, 4), num_classes=5),   # per-head logit scale, cpb MLP
    "swinv2_cr": lambda: swin2_cr.SwinTransformerV2Cr(img_size=(32, 32), patch_size=4, window_size=4, embed_dim=16,
                                                      depths=(1, 1), num_heads=(2, 4), num_classes=5),
}
MIN_DROP = {"davit": 0.35}   # its stage-0 channel attention has 2 heads of 8 (the rest prune about 70 %)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(BUILD))
def test_attention_sized_from_the_input_width_prunes(name):
    torch.manual_seed(0)
    m, x = BUILD[name]().eval(), torch.rand(1, 3, 32, 32)
    p0 = _params(m)
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("head",)), example_inputs=x)
    assert not [n for n in rep.notes if "failed verification" in n]
    assert _params(m) < (1 - MIN_DROP.get(name, 0.6)) * p0
    for mod in m.modules():
        if hasattr(mod, "num_heads") and hasattr(mod, "qkv") and isinstance(mod.qkv, torch.nn.Linear):
            rows = mod.qkv.weight.shape[0]
            assert rows % (3 * mod.num_heads) == 0 or rows % (2 * mod.num_heads) == 0
    for mode in (m.eval, m.train):
        mode()
        with torch.no_grad():
            assert m(x).shape == (1, 5)


def test_cait_residual_group_takes_whole_heads_exactly():
    torch.manual_seed(0)
    m, x = BUILD["cait"]().eval(), torch.rand(1, 3, 32, 32)
    attn = m.blocks[0].attn
    qkv0 = attn.qkv.weight.detach().clone()
    g = DependencyGraph(m, (x,), ignore=[m.head])
    grp = g.group(m.patch_embed.proj, dim="out", idxs=range(8, 16))   # = head 1 of every attention
    rows = next(s for s in grp.slices if s.name == "blocks.0.attn.qkv.weight").idxs.reshape(-1).tolist()
    assert sorted(rows) == [r + p for p in (0, 32, 64) for r in range(8, 16)]   # q, k and v of head 1
    assert {"blocks.0.attn.proj_l.weight", "blocks.0.attn.proj_w.weight", "blocks_token_only.0.attn.q.weight",
            "pos_embed", "cls_token"} <= {s.name for s in grp.slices}
    g.prune([grp])
    assert attn.num_heads == 3 and m.blocks_token_only[0].attn.num_heads == 3
    keep = [r for r in range(96) if r not in rows]
    assert torch.equal(attn.qkv.weight, qkv0[keep][:, [c for c in range(32) if not 8 <= c < 16]])
    assert attn.proj_l.weight.shape[1] == attn.proj_w.weight.shape[0] == 3   # talking heads read/write kept heads
    with torch.no_grad():
        assert m(x).shape == (1, 5)


def test_attention_rope_heads_follow_grouped_query_projections():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 32), AttentionRope(32, num_heads=4, num_kv_heads=2, qkv_fused=False),
                            torch.nn.Linear(32, 3)).eval()
    x = torch.randn(1, 5, 8)
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("2",)), example_inputs=(x,))
    assert not [n for n in rep.notes if "failed verification" in n]
    a = m[1]
    assert a.attn_dim == a.num_heads * a.head_dim == a.q_proj.weight.shape[0] < 32
    assert a.kv_dim == a.num_kv_heads * a.head_dim == a.k_proj.weight.shape[0]
    with torch.no_grad():
        assert m(x).shape == (1, 5, 3)


def test_metaformer_scale_shape_follows_its_channels():
    torch.manual_seed(0)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(3, 8, 1), metaformer.Scale(8, use_nchw=True), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    g = DependencyGraph(m, (x,))
    g.group(m[0], "out", [1, 5]).prune()
    assert m[1].shape == (6, 1, 1) and m[1].scale.shape == (6,) and m(x).shape == (1, 2, 4, 4)


def test_split_sizes_held_in_attributes_follow_the_pieces():
    """``torch.split(x, self.split_indexes)`` (InceptionNeXt), ``[self.dim_conv3, self.dim_untouched]`` (FasterNet)."""
    from timm.models.fasternet import Partial_conv3
    from timm.models.inception_next import InceptionDWConv2d

    nn = torch.nn
    torch.manual_seed(0)
    for mixer, attrs in ((InceptionDWConv2d(16), ("split_indexes",)),
                         (Partial_conv3(16, 4, "split_cat"), ("dim_conv3", "dim_untouched"))):
        m = nn.Sequential(nn.Conv2d(3, 16, 1), mixer, nn.Conv2d(16, 2, 1)).eval()
        x = torch.randn(1, 3, 8, 8)
        before = {a: getattr(mixer, a) for a in attrs}
        rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("2",)), example_inputs=(x,))
        assert not [n for n in rep.notes if "failed verification" in n]
        assert m[0].out_channels < 16 and m(x).shape == (1, 2, 8, 8)
        after = {a: getattr(mixer, a) for a in attrs}
        widths = [sum(v) if isinstance(v, tuple) else v for v in after.values()]
        assert after != before and sum(widths) == m[0].out_channels


def test_selective_kernel_split_follows_its_input_width():
    from timm.layers.selective_kernel import SelectiveKernel

    nn = torch.nn
    torch.manual_seed(0)
    sk = SelectiveKernel(16, 16, split_input=True)
    m = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), sk, nn.Conv2d(16, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)   # train-mode BatchNorm of the pooled attention needs 2
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("3",)), example_inputs=(x,))
    assert not [n for n in rep.notes if "failed verification" in n]
    assert sk.in_channels == m[0].out_channels < 16 and sk.out_channels == m[3].in_channels < 16
    for mode in (m.eval, m.train):
        mode()
        with torch.no_grad():
            assert m(x).shape == (2, 2, 8, 8)
