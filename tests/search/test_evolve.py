"""Evolutionary channel search: determinism, budget, elitism, resume; masking = removal; the winner is pruned."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.errors import ConfigError
from brainsurgeon.prune.costs import measure
from brainsurgeon.search.evolve import Evolve, GeneticSearch
from brainsurgeon.search.evolve_channels import ChannelSpace, evolve_channels

TARGET = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)


def onemax(g: torch.Tensor) -> float:
    """Matching bits with a fixed target (max 12)."""
    return float((g == TARGET).sum())


def test_same_seed_same_result_other_seed_other_path():
    cfg = Evolve(population=8, budget=80, seed=3)
    a = GeneticSearch(cfg, [4, 8]).run(onemax)
    b = GeneticSearch(cfg, [4, 8]).run(onemax)
    c = GeneticSearch(Evolve(population=8, budget=80, seed=4), [4, 8]).run(onemax)
    assert torch.equal(a.genome, b.genome) and a.history == b.history
    assert a.history != c.history or not torch.equal(a.genome, c.genome)


def test_budget_is_respected_and_counted():
    calls = []
    cfg = Evolve(population=10, budget=57, elite=2, seed=0)
    best = GeneticSearch(cfg, [12]).run(lambda g: calls.append(1) or onemax(g))
    assert len(calls) == best.evaluations <= 57
    assert best.evaluations > 57 - 10  # stops only when the next generation would not fit


def test_elitism_keeps_the_best_so_far():
    cfg = Evolve(population=8, budget=200, elite=1, mutation=0.3, seed=1)  # heavy mutation
    best = GeneticSearch(cfg, [12]).run(onemax)
    assert all(b >= a for a, b in itertools.pairwise(best.history))  # never loses the best
    assert best.fitness == max(best.history) == onemax(best.genome)


def test_finds_the_optimum_of_a_small_problem():
    best = GeneticSearch(Evolve(population=16, budget=600, seed=0, init_dense=False), [4, 8]).run(onemax)
    assert best.fitness == 12 and torch.equal(best.genome, TARGET)


def test_every_segment_keeps_a_channel():
    seen = []
    cfg = Evolve(population=8, budget=64, mutation=0.5, init_keep=(0.01, 0.02), seed=0)
    GeneticSearch(cfg, [3, 5, 4]).run(lambda g: seen.append(g) or -float(g.sum()))
    assert all(bool(s.any()) for g in seen for s in g.split([3, 5, 4]))


def test_resume_gives_the_identical_result(tmp_path):
    cfg = Evolve(population=8, budget=96, seed=5)
    full = GeneticSearch(cfg, [4, 8]).run(onemax)
    path = tmp_path / "ga.pt"
    count = [0]

    def flaky(g: torch.Tensor) -> float:
        count[0] += 1
        if count[0] == 45:  # dies in the middle of a generation
            raise KeyboardInterrupt
        return onemax(g)

    with pytest.raises(KeyboardInterrupt):
        GeneticSearch(cfg, [4, 8]).run(flaky, state=path)
    assert path.exists()
    again = GeneticSearch(cfg, [4, 8]).run(onemax, state=path)
    assert torch.equal(again.genome, full.genome) and again.history == full.history
    assert again.evaluations == full.evaluations
    with pytest.raises(ConfigError, match="saved state"):
        GeneticSearch(Evolve(population=8, budget=96, seed=6), [4, 8]).run(onemax, state=path)


def test_config_refusals_name_the_field():
    with pytest.raises(ConfigError, match="budget"):
        Evolve(population=8, budget=4)
    with pytest.raises(ConfigError, match="tournament"):
        Evolve(population=4, tournament=5)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _net() -> TinyNet:
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.bias.uniform_(-0.3, 0.3)
    return m.eval()


def test_masking_equals_removal_and_leaves_no_trace():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    space = ChannelSpace(model, x, ignore=("fc",))
    assert space.segments == [8, 12]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    genome = torch.ones(20, dtype=torch.bool)
    genome[[1, 4, 9, 15, 16]] = False
    with torch.no_grad(), space.masked(genome) as m:
        masked = m(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    est = space.macs_fraction(genome)
    space.prune_(genome)
    assert model.conv1.out_channels == 6 and model.conv2.out_channels == 9
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)
    dense = measure(_net(), x[:1]).total_macs
    assert measure(model, x[:1]).total_macs == pytest.approx(est * dense, rel=1e-6)


def test_evolved_channels_meet_a_mac_budget_and_prune():
    model, x = _net(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        y0 = model(x)
    space = ChannelSpace(model, x[:1], ignore=("fc",))

    def fitness(m: nn.Module, genome: torch.Tensor) -> float:
        with torch.no_grad():
            err = float(((m(x) - y0) ** 2).mean())
        return -err - 10.0 * max(0.0, space.macs_fraction(genome) - 0.5)

    seed = space.l1_genome(0.7)
    best = evolve_channels(space, fitness, Evolve(population=12, budget=120, seed=0), seeds=[seed])
    assert space.macs_fraction(best.genome) <= 0.5 + 1e-9
    with space.masked(seed) as m, torch.no_grad():
        l1_err = float(((m(x) - y0) ** 2).mean())
    assert best.fitness >= -l1_err - 10.0 * max(0.0, space.macs_fraction(seed) - 0.5)  # seed kept if best
    space.prune_(best.genome)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in _net().parameters())
