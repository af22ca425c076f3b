"""DependencyGraph on a plain CNN: groups, exact equivalence after zero-then-prune, counts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brainsurgeon.errors import ConfigError, SurgeryError, UnsupportedOpError
from brainsurgeon.graph import DependencyGraph


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()


def test_group_lists_coupled_slices_and_flatten_blocks():
    m = _cnn()
    g = DependencyGraph(m, (torch.randn(2, 3, 4, 4),))
    grp = g.group(m[0], "out", [0, 2])
    assert grp.n == 2 and grp.root.name == "0.weight"
    names = {(s.name, s.dim, s.role) for s in grp.slices}
    assert names == {("0.weight", 0, "out"), ("0.bias", 0, "out"), ("1.weight", 0, "param"), ("1.bias", 0, "param"),
                     ("1.running_mean", 0, "param"), ("1.running_var", 0, "param"), ("3.weight", 1, "in")}
    fc = g.group(m[3], "out", [1])
    lin = next(s for s in fc.slices if s.name == "6.weight")
    assert lin.idxs.tolist() == [list(range(16, 32))]   # channel 1 -> flat block [16, 32)


def test_prune_is_physical_and_counts_exact():
    m = _cnn()
    x = torch.randn(2, 3, 4, 4)
    g = DependencyGraph(m, (x,))
    before = sum(p.numel() for p in m.parameters())
    grp = g.group(m[3], "out", [0, 5, 9])
    removed = grp.numel()
    grp.prune()
    assert m[3].out_channels == 13 and m[6].in_features == 13 * 16
    assert sum(p.numel() for p in m.parameters()) == before - removed == before - 3 * (8 * 9 + 1) - 3 * 16 * 10
    assert m(x).shape == (2, 10)


def test_index_validation_errors_name_the_fix():
    m = _cnn()
    g = DependencyGraph(m, (torch.randn(2, 3, 4, 4),))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 8\)"):
        g.group(m[0], "out", [8])
    with pytest.raises(ConfigError, match="duplicates"):
        g.group(m[0], "out", [1, 1])
    with pytest.raises(UnsupportedOpError, match="model output"):
        g.group(m[6], "out", [0])
    with pytest.raises(UnsupportedOpError, match="model input"):
        g.group(m[0], "in", [0])


def test_stale_group_is_refused():
    m = _cnn()
    g = DependencyGraph(m, (torch.randn(2, 3, 4, 4),))
    a = g.group(m[0], "out", [0])
    b = g.group(m[0], "out", [1])
    a.prune()
    with pytest.raises(SurgeryError, match="stale"):
        b.prune()


def test_model_that_cannot_run_in_train_mode_is_verified_in_eval_only():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 1, 1)          # BatchNorm cannot train on one value per channel
    g = DependencyGraph(m, (x,))
    g.group(m[0], "out", [1]).prune()
    assert m[0].out_channels == 3 and m[1].num_features == 3 and m[3].in_channels == 3
    assert "one value per channel" in g.report() or "more than 1 value" in g.report()


def test_group_rows_tie_indices_into_one_logical_channel():
    m = _cnn()
    x = torch.randn(2, 3, 4, 4)
    g = DependencyGraph(m, (x,))
    idxs = torch.arange(8)
    grp = g.group(m[0], "out", idxs, rows=(idxs % 4).numpy())
    assert grp.n == 4 and grp.root.idxs.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert next(s for s in grp.slices if s.name == "3.weight").idxs.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    grp.select([1]).prune()
    assert m[0].out_channels == 6 and m[3].in_channels == 6 and m(x).shape == (2, 10)
    with pytest.raises(ConfigError, match="one row per index"):
        g.group(m[0], "out", [0, 1, 2], rows=[0, 2, 2])


class _Hardcoded(nn.Module):
    """conv a feeds a concat; conv d's output is reshaped with a hard-coded width (pruning d must fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.d(x).view(x.shape[0], 8, -1).mean(1)


class _SharedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m, self.b, self.c = _Hardcoded(), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, side = self.m(x)
        return self.c(torch.cat([a, self.b(x)], 1)).flatten(1) + side.sum(1, keepdim=True)


def test_skip_failed_shifts_indices_of_groups_sharing_a_consumer():
    torch.manual_seed(0)
    m = _SharedConsumer().eval()
    x = torch.randn(2, 3, 4, 4)
    g = DependencyGraph(m, (x,))
    ga, gb, gd = (g.group(n, "out", [1, 2]) for n in ("m.a", "b", "m.d"))
    failed = g.prune([ga, gb, gd], skip_failed=True)
    assert [grp.root.name for grp, _ in failed] == ["m.d.weight"] and "pruned width" in failed[0][1]
    assert (m.m.a.out_channels, m.b.out_channels, m.c.in_channels, m.m.d.out_channels) == (2, 2, 4, 8)
    assert m(x).shape == (2, 80)


def test_group_refuses_non_integer_idxs():
    m = _cnn()
    g = DependencyGraph(m, (torch.randn(2, 3, 4, 4),))
    with pytest.raises(ConfigError, match="must be integers"):
        g.group(m[0], "out", [0.5])
    with pytest.raises(ConfigError, match="must be integers"):
        g.group(m[0], "out", torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="sequence of ints"):
        g.group(m[0], "out", ["a"])


def test_graph_modules_import_one_way():
    """graph.py -> commit.py -> group.py must not lead back to graph.py (issue 13, one-way dependencies)."""
    import ast
    import pathlib

    import brainsurgeon.graph as pkg

    root = pathlib.Path(pkg.__file__).parent
    deps = {}
    for f in root.glob("*.py"):
        tree = ast.parse(f.read_text())
        deps[f.stem] = {a.module.lstrip(".") for a in ast.walk(tree)
                        if isinstance(a, ast.ImportFrom) and a.level == 1 and a.module}

    def reaches(src, dst, seen=()):
        return any(d == dst or (d not in seen and reaches(d, dst, (*seen, d))) for d in deps.get(src, ()))

    assert not [m for m in deps if reaches(m, m)]


class PointwiseAggregate(nn.Module):
    """CoaT's head: three class tokens stacked as the *length* of a 1x1 Conv1d (channels along its spatial dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        self.agg, self.spread = nn.Conv1d(3, 1, 1), nn.Conv1d(3, 1, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = torch.stack([self.a(x).mean((2, 3)), self.b(x).mean((2, 3)), self.c(x).mean((2, 3))], 1)  # [B, 3, 8]
        return self.head(self.agg(t)[:, 0] + self.spread(t)[:, 0])


def test_pointwise_conv_carries_positions_along_its_spatial_dims():
    torch.manual_seed(0)
    m, x = PointwiseAggregate().eval(), torch.randn(2, 3, 6, 6)
    g = DependencyGraph(m, (x,), ignore=[m.head])
    with pytest.raises(UnsupportedOpError, match="spatial"):   # a 3-wide kernel mixes neighbouring positions
        g.group(m.a, "out", [0])
    m.spread = nn.Conv1d(3, 1, 1)                               # 1-wide: position p -> position p
    g = DependencyGraph(m, (x,), ignore=[m.head])
    grp = g.group(m.a, "out", [0, 5])
    assert {s.name for s in grp.slices} >= {"a.weight", "b.weight", "c.weight", "head.weight"}
    with torch.no_grad():
        ref = m(x)
        for conv in (m.a, m.b, m.c):
            conv.weight[[0, 5]] = 0
            conv.bias[[0, 5]] = 0
        m.head.weight[:, [0, 5]] = 0                            # the Conv1d biases still reach these columns
        zeroed = m(x)
    g.prune([grp])
    with torch.no_grad():
        out = m(x)
    assert out.shape == ref.shape and m.spread.weight.shape == (1, 3, 1)
    torch.testing.assert_close(out, zeroed)
