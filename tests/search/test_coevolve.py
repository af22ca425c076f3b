"""Co-evolution: two populations scored against each other's best; determinism, budget, resume, GAN fitness."""

from __future__ import annotations

import pytest
import torch

from brainsurgeon.errors import ConfigError
from brainsurgeon.models.gan import PatchDiscriminator, ResnetGenerator
from brainsurgeon.search.coevolve import Recovery, coevolve, generator_fitness, l1_at_budget
from brainsurgeon.search.evolve import Evolve, GeneticSearch
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
    assert abs(fit(dense, None) - (-0.1 * cycle - 100.0 * 0.5)) < 1e-6  # gamma * L_cyc + beta * overshoot
    # the distillation term: alpha * mean |G_p(x) - G(x)|, the rest unchanged
    y0 = G(x).detach()
    with torch.no_grad(), sg.masked(l1) as g:
        dist = float((g(x) - y0).abs().mean())
    plain = generator_fitness(sg, D, x, target=sg.macs_fraction(l1), alpha=0.0)
    assert abs(alone(l1, None) - (plain(l1, None) - dist - 100.0 * (1.0 - sg.macs_fraction(l1)))) < 1e-5


def _trained_bn_pair():
    torch.manual_seed(0)
    G, F_ = ResnetGenerator(ngf=4, blocks=1), ResnetGenerator(ngf=4, blocks=1)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    for m in (G, F_):  # non-trivial running statistics
        m.train()
        with torch.no_grad():
            m(x)
        m.eval()
    return G, F_, x


def test_adapted_bn_uses_the_masked_models_own_statistics_and_restores_everything():
    G, _, x = _trained_bn_pair()
    sg = ChannelSpace(G, x[:1])
    genome = sg.l1_genome(0.5)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    with sg.adapted(genome, [x]) as m:
        assert not m.training
        got = m(x)
        m.train()  # batch statistics of the same batch = the re-estimated running statistics
        want = m(x)
        m.eval()
    assert torch.allclose(got, want, atol=1e-3)  # running_var is unbiased, batch var biased
    with sg.masked(genome) as m:
        stale = m(x)
    assert not torch.allclose(stale, got, atol=1e-3)  # the dense statistics differ
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())
    assert not G.training and all(b.momentum == 0.1 for b in G.modules() if isinstance(b, torch.nn.BatchNorm2d))
    with pytest.raises(ConfigError, match="no batch"), sg.adapted(genome, []):
        pass
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # untouched on the refusal


def test_adapted_bn_memo_reuses_the_statistics_bit_for_bit():
    G, _, x = _trained_bn_pair()
    sg = ChannelSpace(G, x[:1])
    genome, other = sg.l1_genome(0.5), sg.l1_genome(0.25)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    with sg.adapted(genome, [x]) as m:
        want = m(x)
    memo: dict = {}
    with sg.adapted(genome, [x], memo) as m:
        first = m(x)
    with sg.adapted(genome, [x[:2]], memo) as m:  # found in the memo: no forward, so the batches do not matter
        again = m(x)
    assert torch.equal(first, want) and torch.equal(again, want) and len(memo) == 1
    with sg.adapted(other, [x], memo) as m:
        assert not torch.equal(m(x), want)
    assert len(memo) == 2
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # restored after each use


def test_fitness_penalises_unused_budget_and_scores_with_adapted_bn():
    G, F_, x = _trained_bn_pair()
    D = PatchDiscriminator(4).eval()
    sg, sf = ChannelSpace(G, x[:1]), ChannelSpace(F_, x[:1])
    l1, _ = l1_at_budget(sg, 0.5)
    small = sg.l1_genome(0.1)
    m_small = sg.macs_fraction(small)
    plain = generator_fitness(sg, D, x, target=0.5, under=0.0)
    both = generator_fitness(sg, D, x, target=0.5, beta=100.0)
    assert abs((plain(small) - both(small)) - 100.0 * (0.5 - m_small)) < 1e-6  # under-use costs beta per unit
    # with calib, the fitness equals the loss of the adapted model computed by hand
    fit = generator_fitness(sg, D, x, target=0.5, under=0.0, calib=[x], partner=sf, partner_calib=[x], gamma=2.0,
                            alpha=0.5)
    y0 = G(x).detach()
    ref = D(y0)
    with torch.no_grad(), sg.adapted(l1, [x]) as g, sf.adapted(sf.dense_genome(), [x]) as f:
        y = g(x)
        want = -(float(((D(y) - ref) ** 2).mean()) + 0.5 * float((y - y0).abs().mean())
                 + 2.0 * float((f(y) - x).abs().mean()))
    assert abs(fit(l1, None) - want) < 1e-6
    assert fit(l1, None) == fit(l1, None)  # the second call reads the partner's statistics from the memo


def test_coevolution_keeps_its_seed_so_it_is_never_worse_than_its_start():
    target = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5  # one optimum in 2^16

    def fit(g: torch.Tensor, _partner: torch.Tensor) -> float:
        return float((g == target).sum())

    cfg = Evolve(population=4, budget=8, mutation=0.2, seed=0)
    a, b = coevolve(fit, fit, [8, 8], [16], cfg, seeds_a=[target], seeds_b=[~target])
    assert torch.equal(a.genome, target) and a.fitness == 16.0  # the seeded optimum survives (elitism)
    assert b.fitness >= fit(~target, a.genome)


def test_budget_repair_meets_the_budget_exactly_with_top_l1_channels():
    torch.manual_seed(0)
    G = ResnetGenerator(ngf=8, blocks=1).eval()
    sg = ChannelSpace(G, torch.zeros(1, 1, 28, 28))
    ranks = [s.argsort(descending=True) for s in sg.l1_scores()]
    gen = torch.Generator().manual_seed(0)
    for target in (0.5, 0.25, 0.125):
        repair, free = sg.budget_repair(target), sg.budget_repair(target, ranked=False)
        for _ in range(5):
            g = torch.rand(sum(sg.segments), generator=gen) < float(torch.rand(1, generator=gen))
            r = repair(g)
            keep = [int(b.sum()) for b in sg.split(r)]
            assert sg.macs_fraction(r) <= target  # within the budget ...
            for i, n in enumerate(sg.segments):  # ... and no single channel more fits
                if keep[i] < n:
                    assert sg.kept_macs([k + (j == i) for j, k in enumerate(keep)]) > target
            for b, k, order in zip(sg.split(r), keep, ranks, strict=True):  # the top-k L1 channels
                assert b[order[:k]].all() and not b[order[k:]].any()
            assert torch.equal(repair(r), r)  # idempotent: a feasible genome stays
            f = free(g)
            assert [int(b.sum()) for b in sg.split(f)] == keep  # same widths, the genome's own channels first
            for b, fb in zip(sg.split(g), sg.split(f), strict=True):  # drops from / adds to the genome's own set
                assert bool((fb <= b).all()) if int(b.sum()) >= int(fb.sum()) else bool((b <= fb).all())
    # the allocation across groups is kept: a genome keeping twice the channels in group 0 still does
    k = sg.fit_counts([8, 4, 4, 4], 0.25)
    assert k[0] >= 2 * min(k[1:]) - 1
    with pytest.raises(ConfigError, match="raise target"):
        sg.budget_repair(1e-6)


def test_genetic_search_repairs_every_member_and_scores_equal_genomes_once():
    def exactly_three(g: torch.Tensor) -> torch.Tensor:  # three lowest set positions of each segment of 6
        out = torch.zeros_like(g)
        for a in (0, 6):
            out[a:a + 3] = True
        return out

    seen: list[torch.Tensor] = []

    def fit(g: torch.Tensor) -> float:
        seen.append(g)
        return float(g.sum())

    ga = GeneticSearch(Evolve(population=6, budget=30, seed=0), [6, 6], repair=exactly_three)
    best = ga.run(fit)
    assert all(torch.equal(g, exactly_three(g)) for g in seen) and torch.equal(best.genome, exactly_three(best.genome))
    # every member repairs to one genome: scored once per generation, not once per member
    assert len(seen) == best.evaluations == ga.generation == 30


def test_reselect_rescores_the_finalists_and_seeds_on_held_out_fitness():
    noisy = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)  # the training fitness prefers this
    truth = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)  # the held-out fitness prefers the seed

    ga = GeneticSearch(Evolve(population=6, budget=60, seed=0, init_dense=False), [8], seeds=[truth])
    best = ga.run(lambda g: float((g == noisy).sum()))
    assert torch.equal(best.genome, noisy)
    pick = ga.reselect(lambda g: float((g == truth).sum()))
    assert torch.equal(pick.genome, truth) and pick.fitness == 8.0 and pick.evaluations == best.evaluations
    held = [float((g == truth).sum()) for g in pick.runners_up]  # the other distinct finalists, best first
    assert pick.runners_up and held == sorted(held, reverse=True) and all(h <= 8.0 for h in held)
    keys = {g.numpy().tobytes() for g in [pick.genome, *pick.runners_up]}
    assert len(keys) == 1 + len(pick.runners_up) and noisy.numpy().tobytes() in keys
    a, b = coevolve(lambda g, _p: float((g == noisy).sum()), lambda g, _p: float((g == noisy).sum()), [8], [8],
                    Evolve(population=6, budget=60, seed=0, init_dense=False), seeds_a=[truth], seeds_b=[truth],
                    final_a=lambda g, _p: float((g == truth).sum()), final_b=lambda g, _p: float((g == truth).sum()))
    assert torch.equal(a.genome, truth) and torch.equal(b.genome, truth)


def test_pruned_copy_computes_what_the_mask_computes_and_leaves_the_model():
    G, _, x = _trained_bn_pair()
    sg = ChannelSpace(G, x[:1])
    genome = sg.l1_genome(0.5)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    small = sg.pruned(genome)
    with torch.no_grad(), sg.masked(genome) as m:
        want = m(x)
    assert torch.allclose(small(x), want, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in G.parameters())
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())


def test_recovery_distils_the_pruned_copy_caches_it_and_is_deterministic():
    G, F_, x = _trained_bn_pair()
    sg, sf = ChannelSpace(G, x[:1]), ChannelSpace(F_, x[:1])
    xs = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    before = {k: v.clone() for k, v in G.state_dict().items()}
    genome = sg.l1_genome(0.5)
    rec = Recovery(sg, xs, steps=6, batch=4, lr=1e-2, calib=[x])
    m = rec(genome)
    assert not m.training and rec.trained == 1 and rec(genome) is m  # cached: trained once
    with torch.no_grad():
        y0 = G(xs)
        start = sg.pruned(genome)
        ChannelSpace._estimate(start, [b for b in start.modules() if isinstance(b, torch.nn.BatchNorm2d)], [x])
        start.eval()
        assert float((m(xs) - y0).abs().mean()) < float((start(xs) - y0).abs().mean())  # it distilled
    again = Recovery(sg, xs, steps=6, batch=4, lr=1e-2, calib=[x])(genome)
    assert torch.equal(again(x), m(x))  # bit-identical on a rerun
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # the space's model untouched
    small = Recovery(sg, xs, steps=1, batch=4, cache=1)
    small(genome)
    small(sg.l1_genome(0.25))
    assert len(small.cache) == 1 and small.trained == 2
    # the fitness with recovery scores the recovered candidate and the recovered partner
    D = PatchDiscriminator(4).eval()
    rf = Recovery(sf, xs, steps=2, batch=4, calib=[x])
    pg = sf.l1_genome(0.5)
    fit = generator_fitness(sg, D, x, target=0.5, partner=sf, recovery=rec, partner_recovery=rf, beta=0.0)
    with torch.no_grad():
        y0, y = G(x), m(x)
        want = -(float(((D(y) - D(y0)) ** 2).mean()) + float((y - y0).abs().mean())
                 + 0.1 * float((rf(pg)(y) - x).abs().mean()))
    assert abs(fit(genome, pg) - want) < 1e-6 and rec.trained == 1 and rf.trained == 1
    with pytest.raises(ConfigError, match="steps \\* batch"):
        Recovery(sg, xs, steps=7, batch=4)
