"""The torch.export tracer gives the same groups and the same pruned models as the dispatch tracer."""

from __future__ import annotations

import copy

import pytest
import torch
from graph_fixtures import build
from torch import nn

from brainsurgeon.errors import ConfigError, UnsupportedOpError
from brainsurgeon.graph import DependencyGraph


def _prune_every_other(model: nn.Module, x: object, tracer: str) -> tuple[list[tuple], int, str]:
    m = copy.deepcopy(model)
    g = DependencyGraph(m, x, tracer=tracer)
    groups = g.groups()
    sig = sorted((grp.root.name, grp.root.dim, grp.n, tuple(sorted((s.name, s.dim) for s in grp.slices)))
                 for grp in groups)
    g.prune([grp.select(torch.arange(0, grp.n, 2)) for grp in groups])
    return sig, sum(p.numel() for p in m.parameters()), g.report()


@pytest.mark.parametrize("name", ["ResidualAdd", "MHA", pytest.param("LSTM", marks=pytest.mark.slow),
                                  pytest.param("TinyBERT", marks=pytest.mark.slow)])
def test_export_and_dispatch_tracers_agree(name):
    if name == "TinyBERT":
        pytest.importorskip("transformers")
    model, x = build(name)
    sig_d, n_d, rep_d = _prune_every_other(model, x, "dispatch")
    sig_e, n_e, rep_e = _prune_every_other(model, x, "export")
    assert sig_e == sig_d and len(sig_d) > 0
    assert n_e == n_d < sum(p.numel() for p in model.parameters())
    assert "tracer=aten-dispatch" in rep_d and "tracer=torch.export" in rep_e


class _AuxHead(nn.Module):
    """An auxiliary head that only runs in train mode (GoogLeNet-style): both tracers need the train trace."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(h) + self.aux(h) if self.training else self.head(h)


def test_export_tracer_covers_train_only_branches():
    model, x = _AuxHead().eval(), (torch.randn(2, 4),)
    sig_d, n_d, _ = _prune_every_other(model, x, "dispatch")
    sig_e, n_e, _ = _prune_every_other(model, x, "export")
    assert sig_e == sig_d and n_e == n_d
    assert any("aux.weight" in name for _, _, _, slices in sig_e for name, _ in slices)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y[y > 0].reshape(-1, 1).sum(0) if bool((y > 0).any()) else y.sum(0)


def test_export_failure_names_the_model_and_suggests_dispatch():
    with pytest.raises(UnsupportedOpError, match=r"_DataDependent.*tracer='dispatch'"):
        DependencyGraph(_DataDependent(), (torch.randn(3, 4),), tracer="export")


def test_unknown_tracer_is_a_config_error():
    with pytest.raises(ConfigError, match="tracer must be"):
        DependencyGraph(nn.Linear(2, 2), (torch.randn(1, 2),), tracer="fx")
