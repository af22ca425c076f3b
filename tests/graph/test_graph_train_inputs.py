"""train_inputs: a model whose train-mode forward needs other inputs (a detector's targets) is traced and
verified in train mode on them, so a train-only branch that breaks after pruning is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.errors import SurgeryError
from brainsurgeon.graph import DependencyGraph


class NeedsTargets(nn.Module):
    """Eval: logits. Train: a loss, which needs targets; ``hard_coded`` adds a train-only branch that
    views the features with a fixed width of 8 (breaks once conv channels are removed)."""

    def __init__(self, hard_coded: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.hard_coded = hard_coded

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        f = self.bn(self.conv(x)).mean((2, 3))
        out = self.head(f)
        if not self.training:
            return out
        if y is None:
            raise ValueError("targets are needed in train mode")
        loss = F.cross_entropy(out, y)
        if self.hard_coded:
            loss = loss + f.view(f.shape[0], 8).pow(2).mean()
        return loss


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 6, 6, generator=g), torch.tensor([1, 3])


def test_train_mode_is_verified_on_train_inputs():
    torch.manual_seed(0)
    m, (x, y) = NeedsTargets().eval(), _data()
    g = DependencyGraph(m, (x,), train_inputs=(x, y))
    g.group(m.conv, "out", [0, 5]).prune()
    assert (m.conv.out_channels, m.bn.num_features, m.head.in_features) == (6, 6, 6)
    assert "train mode not traced/verified" not in g.report()
    m.train()
    assert torch.isfinite(m(x, y))                     # the train-mode forward still runs


def test_train_only_breakage_is_refused_with_train_inputs_and_missed_without():
    x, y = _data()
    torch.manual_seed(0)
    m = NeedsTargets(hard_coded=True).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = DependencyGraph(m, (x,), train_inputs=(x, y))
    with pytest.raises(SurgeryError, match="train-mode"):
        g.group(m.conv, "out", [0, 5]).prune()
    assert m.conv.out_channels == 8 and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # without targets the train-mode forward cannot run at all, so only eval mode is checked (and says so)
    g2 = DependencyGraph(m, (x,))
    g2.group(m.conv, "out", [0, 5]).prune()
    assert m.conv.out_channels == 6 and "targets are needed" in g2.report()
