"""prune_ on concatenated and split branches: groups of one step that share a consumer's input dim.

Regression for the KeptIndex bookkeeping (issue 14 #1, issue 13 #6): every group's positions index the
state before the step, so two groups feeding one ``torch.cat`` consumer must not see each other's removals.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.prune import ChannelPruning, prune_


class CatBranches(nn.Module):
    """Two convs concatenated into one 1x1 conv (the issue's minimal case)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(16, 8, 1)
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        return self.classifier(self.mid(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)).mean((2, 3)))


class ChunkSplit(nn.Module):
    """One conv chunked in two, each half through its own conv, then concatenated again."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 12, 3, padding=1)
        self.fuse = nn.Conv2d(20, 8, 1)
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        u, v = torch.chunk(F.relu(self.stem(x)), 2, dim=1)
        h = torch.cat([self.left(u), self.right(v)], 1)
        p, q = torch.split(h, [self.left.out_channels, self.right.out_channels], dim=1)
        return self.classifier(self.fuse(torch.cat([q, p], 1)).mean((2, 3)))


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("build", [CatBranches, ChunkSplit])
def test_concat_consumers_prune_and_run(build, steps):
    torch.manual_seed(0)
    m = build().eval()
    x = torch.randn(1, 3, 16, 16)
    n0 = _params(m)
    rep = prune_(m, ChannelPruning(ratio=0.5, steps=steps, ignore=("classifier",)), example_inputs=x)
    assert m(x).shape == (1, 10)
    assert m.train()(x).shape == (1, 10)
    assert _params(m) < 0.75 * n0
    assert rep.metrics["params"]["after"] == _params(m)


def test_concat_widths_follow_both_producers():
    torch.manual_seed(0)
    m = CatBranches().eval()
    prune_(m, ChannelPruning(ratio=0.5, ignore=("classifier",)), example_inputs=torch.randn(1, 3, 16, 16))
    assert (m.a.out_channels, m.b.out_channels) == (4, 4)
    assert m.mid.in_channels == 8


def test_obs_reconstruction_through_a_concat_uses_the_kept_rows():
    torch.manual_seed(0)
    m = CatBranches().eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    prune_(m, ChannelPruning(ratio=0.5, reconstruct="obs", ignore=("classifier",)),
           example_inputs=torch.randn(1, 3, 16, 16), calib=calib)
    assert m.mid.weight.shape == (4, 8, 1, 1) and torch.isfinite(m.mid.weight).all()


def test_googlenet_aux_logits_at_64px():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    x = torch.randn(1, 3, 64, 64)
    n0 = _params(m)
    prune_(m, ChannelPruning(ratio=0.5, ignore=("fc", "aux1.fc2", "aux2.fc2")), example_inputs=x)
    assert m(x).shape == (1, 1000)
    assert _params(m) < 0.75 * n0


@pytest.mark.parametrize("build", [CatBranches, ChunkSplit])
def test_kept_index_maps_every_sliced_dim_to_the_original_positions(build):
    """After one step with every group pruned at once, ``kept[key]`` selects the surviving slices of the
    original tensors (a wrong order of bookkeeping selects other columns, silently)."""
    from brainsurgeon.graph import DependencyGraph
    from brainsurgeon.prune.api import KeptIndex

    torch.manual_seed(0)
    m = build().eval()
    orig = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = DependencyGraph(m, torch.randn(1, 3, 16, 16), ignore=["classifier"])
    kept = KeptIndex(m)
    groups = [grp for grp in g.groups() if grp.n > 1 and not any(s.module == "classifier" and s.role == "out"
                                                                for s in grp.slices)]
    chosen = [(grp, torch.arange(1, grp.n, 2)) for grp in groups]
    sizes = [kept.sizes(grp) for grp, _ in chosen]
    assert g.prune([grp.select(r) for grp, r in chosen], skip_failed=True) == []
    kept.record([(grp, r, s) for (grp, r), s in zip(chosen, sizes, strict=True)])
    assert kept.kept
    per: dict[str, dict[int, torch.Tensor]] = {}
    for (mod, tensor, dim), idx in kept.kept.items():
        per.setdefault(f"{mod}.{tensor}", {})[dim] = idx
    for name, dims in per.items():
        want = orig[name]
        for dim, idx in dims.items():
            want = want.index_select(dim, idx)
        mod, _, tensor = name.rpartition(".")
        assert torch.equal(want, getattr(m.get_submodule(mod), tensor)), name
