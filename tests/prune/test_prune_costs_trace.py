"""MACs come from the recorded trace, and counting them can never fail a prune (issue 14 #2)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from brainsurgeon.prune import ChannelPruning, measure, prune_


class ExpandedToken(nn.Module):
    """timm cait's class-attention shape: an MLP applied to an expanded class token (a view of a Parameter)."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.proj = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.proj(x)
        t = self.cls_token.expand(x.shape[0], -1, -1)
        t = t + self.fc2(F.relu(self.fc1(t)))
        return self.head((torch.cat([t, h], 1)).mean(1))


def test_expanded_class_token_prunes_and_counts():
    torch.manual_seed(0)
    m = ExpandedToken().eval()
    x = torch.randn(2, 5, 8)
    rep = prune_(m, ChannelPruning(ratio=0.5, ignore=("head",)), example_inputs=x)
    assert m.fc1.out_features == 16 and m(x).shape == (2, 4)
    macs = rep.metrics["macs"]
    assert 0 < macs["after"] < macs["before"]
    assert macs["after"] == measure(m, x).total_macs


def test_trace_macs_equal_flop_counter_per_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    c = measure(m, x)
    assert c.total_macs == fc.get_total_flops() // 2
    assert c.macs == {"0": 2 * 8 * 27 * 36, "2": 2 * 4 * 8 * 36, "4": 2 * 5 * 144}


def test_untraceable_model_gets_empty_macs_not_an_error():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            raise RuntimeError("user forward fails")

    c = measure(Fails(), torch.zeros(1, 3))
    assert c.total_macs == 0 and c.total_params == 12
