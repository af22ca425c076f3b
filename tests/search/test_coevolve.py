"""Co-evolution: two populations scored against each other's best; determinism, budget, resume, GAN fitness."""

from __future__ import annotations

import torch

from brainsurgeon.models.gan import PatchDiscriminator, ResnetGenerator
from brainsurgeon.search.coevolve import coevolve, generator_fitness, l1_at_budget
from brainsurgeon.search.evolve import Evolve
from brainsurgeon.search.evolve_channels import ChannelSpace

TARGET_B = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)


def fit_a(g: torch.Tensor, best_b: torch.Tensor) -> float:
    """A scores by agreeing with B's current best: its optimum moves with the partner."""
    return float((g == best_b).sum())


def fit_b(g: torch.Tensor, best_a: torch.Tensor) -> float:
    return float((g == TARGET_B).sum()) + 0.1 * float((g == best_a).sum())


def test_populations_follow_each_other_to_the_joint_optimum():
    cfg = Evolve(population=10, budget=400, mutation=0.1, seed=0, init_dense=False)
    a, b = coevolve(fit_a, fit_b, [4, 4], [8], cfg)
    assert torch.equal(b.genome, TARGET_B)
    assert torch.equal(a.genome, TARGET_B)  # A tracked B's best
    assert a.evaluations <= 400 and b.evaluations <= 400


def test_coevolution_is_deterministic_and_resumes_identically(tmp_path):
    cfg = Evolve(population=6, budget=60, seed=2)
    ref = coevolve(fit_a, fit_b, [4, 4], [8], cfg)
    again = coevolve(fit_a, fit_b, [4, 4], [8], cfg)
    assert all(torch.equal(x.genome, y.genome) and x.history == y.history for x, y in zip(ref, again, strict=True))
    path = tmp_path / "co.pt"
    calls = [0]

    def dies(g: torch.Tensor, best: torch.Tensor) -> float:
        calls[0] += 1
        if calls[0] == 20:
            raise KeyboardInterrupt
        return fit_b(g, best)

    try:
        coevolve(fit_a, dies, [4, 4], [8], cfg, state=path)
    except KeyboardInterrupt:
        pass
    resumed = coevolve(fit_a, fit_b, [4, 4], [8], cfg, state=path)
    assert all(torch.equal(x.genome, y.genome) and x.history == y.history for x, y in zip(ref, resumed, strict=True))


def test_generator_fitness_prefers_the_dense_mask_and_punishes_overshoot():
    torch.manual_seed(0)
    G, F_, D = ResnetGenerator(ngf=4, blocks=1).eval(), ResnetGenerator(ngf=4, blocks=1).eval(), PatchDiscriminator(4)
    D.eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    sg, sf = ChannelSpace(G, x[:1]), ChannelSpace(F_, x[:1])
    fit = generator_fitness(sg, D, x, target=0.5, partner=sf)
    dense = sg.dense_genome()
    l1, keep = l1_at_budget(sg, 0.5)
    assert 0 < keep < 1 and sg.macs_fraction(l1) <= 0.5
    # the dense generator has no discriminator-aware loss; it pays only the overshoot and the cycle term
    alone = generator_fitness(sg, D, x, target=1.0)
    assert alone(dense, None) == 0.0
    assert alone(l1, None) < 0.0
    cycle = float((F_(G(x)) - x).abs().mean().detach())
    assert abs(fit(dense, None) - (-10.0 * cycle - 100.0 * 0.5)) < 1e-6  # gamma * L_cyc + beta * overshoot
