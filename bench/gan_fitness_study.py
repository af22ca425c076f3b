"""How well does a GA fitness rank channel candidates by their result after the fine-tuning? (gan_coevolve's study)

    python bench/gan_fitness_study.py --target 2        # 1/2 of the MACs; also --target 4, --target 8

Candidate pairs (G and F genomes, all budget-repaired to the target, top-L1 channels per group): the uniform
L1 seed, `--random` pairs of random per-group widths (drawn like ``GeneticSearch``'s initial members) and
`--mutants` 5 % bit-flip mutants of the seed. Each pair is physically pruned and fine-tuned as every arm of
``gan_coevolve.py`` is (40 steps, ``finetune_pair_``, fine-tuning seeds 0 and 1); its result is l1_G + l1_F
to the known style on 512 *training* images the fitness never sees (no test image). Printed: the Spearman
rank correlation of each fitness (G's and F's, each against the other, summed) with that result: the
zero-shot fitness (adaptive BN, no training) and the fitness after a ``Recovery`` of 5 or 10 steps.
A study, not a bench: no bound.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from brainsurgeon.models.gan import finetune_pair_, mnist_domains, pretrained_cyclegan, translation_scores
from brainsurgeon.search.coevolve import Recovery, generator_fitness, l1_at_budget
from brainsurgeon.search.evolve import Evolve, GeneticSearch
from brainsurgeon.search.evolve_channels import ChannelSpace


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson's of the ranks; the scores here have no ties)."""
    rx, ry = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=int, default=2, help="fewer MACs by this factor (2, 4, 8)")
    ap.add_argument("--random", type=int, default=8)
    ap.add_argument("--mutants", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, target = time.process_time(), 1 / args.target
    G0, F0, D_A, D_B = pretrained_cyclegan()
    a_train, b_train, _, _ = mnist_domains()
    # the bench's --quick slices: fitness, adaptive BN, held-out, recovery; the result on the last 512 images
    fit_a, fit_b = a_train[:32] * 2 - 1, b_train[:32] * 2 - 1
    bn_a, bn_b = [a_train[64:96] * 2 - 1], [b_train[64:96] * 2 - 1]
    rec_a, rec_b = a_train[224:544] * 2 - 1, b_train[224:544] * 2 - 1
    truth = a_train[-512:]
    ex = fit_a[:1]
    sg, sf = ChannelSpace(copy.deepcopy(G0), ex), ChannelSpace(copy.deepcopy(F0), ex)
    rep_g, rep_f = sg.budget_repair(target), sf.budget_repair(target)
    init_g = GeneticSearch(Evolve(population=args.random + 1, budget=64, seed=7), sg.segments, [], repair=rep_g)
    init_f = GeneticSearch(Evolve(population=args.random + 1, budget=64, seed=8), sf.segments, [], repair=rep_f)
    gen = torch.Generator().manual_seed(0)
    seed_g, seed_f = rep_g(l1_at_budget(sg, target)[0]), rep_f(l1_at_budget(sf, target)[0])
    pairs = [(seed_g, seed_f), *zip(init_g.pop[1:], init_f.pop[1:], strict=True)]
    for _ in range(args.mutants):
        pairs.append(tuple(r(s ^ (torch.rand(len(s), generator=gen) < 0.05))
                           for r, s in ((rep_g, seed_g), (rep_f, seed_f))))
    fitness = {"zero-shot (adaptive BN)": (dict(calib=bn_a, partner_calib=bn_b), dict(calib=bn_b, partner_calib=bn_a))}
    for steps in (5, 10):
        rg, rf = Recovery(sg, rec_a, steps=steps, calib=bn_a), Recovery(sf, rec_b, steps=steps, calib=bn_b)
        fitness[f"after a {steps}-step Recovery"] = (dict(recovery=rg, partner_recovery=rf),
                                                   dict(recovery=rf, partner_recovery=rg))
    scores: dict[str, list[float]] = {k: [] for k in fitness}
    for name, (kg, kf) in fitness.items():
        fg = generator_fitness(sg, D_B, fit_a, target, partner=sf, beta=0.0, **kg)
        ff = generator_fitness(sf, D_A, fit_b, target, partner=sg, beta=0.0, **kf)
        scores[name] = [-(fg(g, f) + ff(f, g)) for g, f in pairs]  # a loss: lower is better
    results, caches = [], [{}, {}]
    for g, f in pairs:
        r = []
        for seed in (0, 1):
            G, F_ = sg.pruned(g), sf.pruned(f)
            finetune_pair_(G, F_, G0, F0, a_train, b_train, 40, seed=seed, cache=caches[seed])
            s = translation_scores(G, F_, truth)
            r.append(s["l1_G"] + s["l1_F"])
        results.append(sum(r) / 2)
        print(f"  G {[int(b.sum()) for b in sg.split(g)]} F {[int(b.sum()) for b in sf.split(f)]}: after 40 steps "
              f"{r[0]:.5f} / {r[1]:.5f}", flush=True)
    print(f"1/{args.target} of the MACs, {len(pairs)} pairs (uniform L1 seed {results[0]:.5f}, best "
          f"{min(results):.5f}, worst {max(results):.5f}); Spearman with l1_G + l1_F after fine-tuning:")
    for name, s in scores.items():
        best = min(range(len(s)), key=s.__getitem__)
        print(f"  {name:<26} {spearman(s, results):+.2f}   its best pair ends at {results[best]:.5f}")
    print(f"  ({time.process_time() - t0:.0f} CPU s)")


if __name__ == "__main__":
    main()
