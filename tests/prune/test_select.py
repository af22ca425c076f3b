"""Channel selection: exact kept counts with round_to and units; the global ranking's per-layer guard."""

import math

import pytest
import torch

from brainsurgeon.prune import keep_count, select_global, select_local


@pytest.mark.parametrize("n,ratio,round_to,keep", [
    (32, 0.5, 1, 16), (32, 0.3, 1, 23), (32, 0.3, 8, 24), (30, 0.5, 8, 16), (64, 0.75, 16, 16),
    (7, 0.5, 1, 4), (8, 0.0, 1, 8), (8, 0.99, 1, 1), (10, 0.5, 16, 10), (96, 0.5, 8, 48),
])
def test_keep_count_exact(n, ratio, round_to, keep):
    assert keep_count(n, ratio, round_to) == keep
    assert keep % round_to == 0 or keep == n


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio,round_to", [(0.5, 1), (0.3, 4), (0.7, 8)])
def test_select_local_removes_the_lowest_exact_count(seed, ratio, round_to):
    s = torch.rand(40, generator=torch.Generator().manual_seed(seed))
    rows = select_local(s, ratio, round_to)
    assert rows.numel() == 40 - keep_count(40, ratio, round_to)
    kept = torch.ones(40, dtype=torch.bool)
    kept[rows] = False
    assert s[rows].max() <= s[kept].min()
    assert torch.equal(rows, rows.sort().values)


def test_select_local_units_whole_and_dims():
    s = torch.tensor([5., 5., 0., 0., 9., 9., 1., 1.])  # 4 units of 2
    assert select_local(s, 0.5, unit=2, heads="whole").tolist() == [2, 3, 6, 7]
    s = torch.tensor([5., 0., 6., 1., 7., 0.5])  # 3 units of 2; position 1 is weak in every unit
    assert select_local(s, 0.5, unit=2, heads="dims").tolist() == [1, 3, 5]


def test_iterative_targets_count_from_the_original_width():
    s = torch.rand(12, generator=torch.Generator().manual_seed(0))  # a group already pruned 16 -> 12
    assert select_local(s, 0.5, n_orig=16).numel() == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio,mlr", [(0.5, 0.6), (0.3, 0.4), (0.6, 0.9)])
def test_global_budget_and_max_layer_ratio(seed, ratio, mlr):
    g = torch.Generator().manual_seed(seed)
    widths = [16, 32, 8, 64]
    # group 1 is far weaker than the rest: an unguarded global ranking would empty it
    scores = [torch.rand(n, generator=g) * (0.01 if i == 1 else 1.0) for i, n in enumerate(widths)]
    rows = select_global(scores, ratio, mlr)
    for n, r in zip(widths, rows, strict=True):
        assert n - r.numel() >= keep_count(n, mlr)
    assert sum(r.numel() for r in rows) == math.floor(ratio * sum(widths))
    assert rows[1].numel() == 32 - keep_count(32, mlr)  # the weak group hits the guard exactly


def test_global_is_a_ranking():
    scores = [torch.tensor([0., 1., 5., 6.]), torch.tensor([2., 3., 4., 7.])]
    rows = select_global(scores, 0.5, 0.9)
    assert [r.tolist() for r in rows] == [[0, 1], [0, 1]]


def test_global_round_to_never_exceeds_the_guard():
    scores = [torch.arange(32.), torch.arange(32.) + 100]
    rows = select_global(scores, 0.4, 0.9, round_to=8)
    for r in rows:
        assert (32 - r.numel()) % 8 == 0
