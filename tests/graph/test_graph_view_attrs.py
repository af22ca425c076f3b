"""A GAT written with fixed head sizes in ``view`` (issue #6): ``h.view(n, self.heads, self.hd)``. The
head split is followed like GQA's: whole heads are pruned and ``self.heads`` follows; when the size is
ambiguous (two attributes hold it) the refusal is named in ``g.report()``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import brainsurgeon as bs
from brainsurgeon.graph import DependencyGraph


class GAT(nn.Module):
    def __init__(self, heads: int = 4, hd: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.heads, self.hd, self.layers = heads, hd, layers
        self.w = nn.Linear(16, heads * hd, bias=False)
        self.a_src, self.a_dst = nn.Parameter(torch.randn(heads, hd)), nn.Parameter(torch.randn(heads, hd))
        self.out, self.head = nn.Linear(heads * hd, 32), nn.Linear(32, 3)

    def forward(self, x, adj):
        n = x.shape[0]
        h = self.w(x).view(n, self.heads, self.hd)                        # [N, H, hd]
        e = (h * self.a_src).sum(-1)[:, None, :] + (h * self.a_dst).sum(-1)[None, :, :]   # [N, N, H]
        att = torch.softmax(F.leaky_relu(e).masked_fill(adj[..., None] == 0, -1e9), dim=1)
        h = torch.einsum("ijh,jhd->ihd", att, h).reshape(n, -1)           # [N, H*hd]
        return self.head(F.elu(self.out(h)))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(12, 16, generator=g), (torch.rand(12, 12, generator=g) > 0.6).float() + torch.eye(12)


def test_gat_prunes_whole_heads_and_the_head_count_follows():
    torch.manual_seed(0)
    m, (x, adj) = GAT().eval(), _inputs()
    g = DependencyGraph(m, (x, adj), ignore=[m.head])
    grp = g.group(m.w, "out", list(range(8, 16)) + list(range(24, 32)))   # heads 1 and 3
    assert {s.name for s in grp.slices} == {"w.weight", "a_src", "a_dst", "out.weight"}
    keep = [0, 2]
    with torch.no_grad():   # reference: the same GAT built with heads 0 and 2 only
        ref = GAT(heads=2).eval()
        ref.w.weight.copy_(m.w.weight.view(4, 8, 16)[keep].reshape(16, 16))
        ref.a_src.copy_(m.a_src[keep])
        ref.a_dst.copy_(m.a_dst[keep])
        ref.out.weight.copy_(m.out.weight.view(32, 4, 8)[:, keep].reshape(32, 16))
        ref.out.bias.copy_(m.out.bias)
        ref.head.load_state_dict(m.head.state_dict())
    g.prune([grp])
    assert m.heads == 2 and m.hd == 8 and m.a_src.shape == (2, 8)
    with torch.no_grad():
        assert torch.equal(m(x, adj), ref(x, adj))


def test_prune_halves_the_heads_of_a_gat():
    torch.manual_seed(0)
    m, inputs = GAT().eval(), _inputs()
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("head",)), example_inputs=inputs)
    assert not [n for n in rep.notes if "failed verification" in n]
    assert (m.heads, m.w.out_features, m.out.in_features) == (2, 16, 16)


def test_an_ambiguous_head_size_is_named_in_the_report():
    torch.manual_seed(0)
    m, inputs = GAT(heads=4, hd=8, layers=4).eval(), _inputs()      # self.heads == self.layers == 4
    g = DependencyGraph(m, inputs, ignore=[m.head])
    report = g.report()
    assert "size 4 = self.heads, self.layers" in report and "pass -1" in report
    rep = bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("head",)), example_inputs=inputs)
    assert m.heads == 4 and m.w.out_features == 32                    # refused, model unchanged there
    assert any("w.weight" in n and "failed verification" in n for n in rep.notes)
