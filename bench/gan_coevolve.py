"""Co-evolutionary compression of CycleGAN generators (Shu et al., ICCV 2019) vs uniform L1, evolution alone
and OBS-reconstruction channel pruning, on MNIST <-> thickened-inverted MNIST with a known ground truth.

    python bench/gan_coevolve.py --quick    # 2x/4x/8x fewer generator MACs: co-evolution vs uniform L1 only
    python bench/gan_coevolve.py            # all five arms; population 12, 96 evaluations, 200 fine-tuning steps,
                                            # 2,000 test images (--budget 2 / 4 / 8: one part, 4-7 CPU minutes)

``--quick`` runs only the two arms the bound compares (co-evolution and uniform L1); evolution alone, L1
budget-filled and OBS-reconstruction pruning run in the full run only.

Data: the GAs' fitness batches, adaptive-BN batches, held-out re-selection images and recovery images are
disjoint slices of the MNIST *training* half each domain is built from (``mnist_domains``); the reported fidelity
is on MNIST *test* images, which no search, re-selection or fine-tuning step sees. (The default fitness weights
alpha=1, gamma=0.1 were first chosen from a correlation study scored on test images; re-done on held-out
training images they still rank best of the combinations tried: ``search.coevolve.generator_fitness``.)

The trained pair (G: A -> B, F: B -> A; ``brainsurgeon.models.gan``) ships as package data (safetensors).
Arms at each budget (fraction of each generator's MACs kept: 1/2, 1/4, 1/8), all over the same
dependency-graph channel groups (5 per generator):

* uniform L1: the same kept fraction in every group, filters ranked by L1 norm (Li et al. 2017), the
  largest fraction whose MACs fit;
* L1 budget-filled: uniform L1 through ``ChannelSpace.budget_repair`` (channels added while one fits, so
  the MACs budget is used up to one channel) -- the seed both GAs start from;
* evolution alone: a GA per generator (``GeneticSearch``), fitness ``-(L_DisA + L_dist)`` (no partner);
* co-evolution: the two populations in turns, fitness ``-(L_DisA + L_dist + 0.1 L_cyc(partner's best))``
  (``search.coevolve``); the same evaluation budget per generator as evolution alone.
  Both GAs: every candidate repaired to the MAC budget with the top-L1 channels of each group (a search
  over per-group widths), seeded with the uniform L1 masks, and scored after a short recovery
  (``search.coevolve.Recovery``): the candidate physically pruned, distilled 10 Adam steps of 32 images toward
  the dense generator (the fine-tuning's own lr and loss, on 320 training images of its domain outside
  every other slice), BatchNorm statistics re-estimated on 32 images (adaptive BN), and the partner's best
  scored the same way; fitness terms on 32 (full: 64) images. Why: at 1/2 of the MACs the zero-shot fitness
  (adaptive BN, no training) does not rank the candidates by their result after fine-tuning
  (``bench/gan_fitness_study.py``), while the recovered one does. The finalists are re-scored on 128
  (full: 256) held-out images (``GeneticSearch.reselect``; recoveries are cached per genome) and the best
  there is kept; the search time, recoveries included, is in "search s";
* OBS-reconstruction channel pruning: ``prune_(ChannelPruning(ratio=1 - kept, reconstruct="obs"))`` at the
  uniform L1 arm's kept fraction (its consumers re-solved by least squares on 256 A / B images; full run only).

Every arm is physically pruned, then fine-tuned the same number of steps (L1 to the dense generators' outputs
+ cycle L1, ``models.gan.finetune_pair_``; every arm reads the same seeded batches, so the dense generators' outputs
are computed once per step for all arms: ``cache=``, bit-identical training). Fidelity is exact: L1 of G(a) to
style(a) and of F(style(a)) to a on held-out MNIST test images, and the frozen MNIST CNN's accuracy on F(style(a))
and on 1 - G(a).
MACs and parameters are measured on the pruned generators; latency: median CPU ms of a 64-image batch.

Bound (fixed before the first run): after fine-tuning, co-evolution's fidelity error l1_G + l1_F is below
uniform L1's at every budget. Exit 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import brainsurgeon as bs
from brainsurgeon.models import pretrained
from brainsurgeon.models.gan import finetune_pair_, mnist_domains, pretrained_cyclegan, translation_scores
from brainsurgeon.prune.costs import measure
from brainsurgeon.quant.measure import time_model
from brainsurgeon.search.coevolve import Recovery, coevolve, generator_fitness, l1_at_budget
from brainsurgeon.search.evolve import Evolve, GeneticSearch
from brainsurgeon.search.evolve_channels import ChannelSpace

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILED.append(what)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run; exit 1 if the bound fails")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ft-seed", type=int, default=0,
                    help="seed of the final fine-tuning every arm gets (to show a margin across seeds)")
    ap.add_argument("--budget", type=int, choices=(2, 4, 8), action="append",
                    help="only this MACs reduction (repeatable; default 2, 4 and 8): to run the full run in parts")
    ap.add_argument("--train", type=int, metavar="STEPS", default=0,
                    help="retrain the CycleGAN for STEPS steps and write the package weights (models/weights/)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    t0, w0 = time.process_time(), time.perf_counter()
    if args.train:
        from brainsurgeon.models.gan import _weights_path, save_cyclegan, train_cyclegan

        a, b, _, _ = mnist_domains()
        save_cyclegan(*train_cyclegan(a, b, steps=args.train), _weights_path())
        print(f"trained {args.train} steps in {time.process_time() - t0:.0f} CPU s -> {_weights_path()}")
    G0, F0, D_A, D_B = pretrained_cyclegan()
    clf, _, _ = pretrained("mnist-cnn")
    a_train, b_train, a_test, y_test = mnist_domains()
    n_test = 256 if q else 2000
    a_test, y_test = a_test[:n_test], y_test[:n_test]
    fit_a, fit_b = a_train[:32 if q else 64] * 2 - 1, b_train[:32 if q else 64] * 2 - 1  # fitness batches (GAN range)
    bn_a, bn_b = [a_train[64:96] * 2 - 1], [b_train[64:96] * 2 - 1]  # adaptive-BN batches (disjoint from fitness)
    n_val = 128 if q else 256  # held-out images on which the GAs' finalists are re-scored (disjoint from both)
    val_a, val_b = a_train[96:96 + n_val] * 2 - 1, b_train[96:96 + n_val] * 2 - 1
    rec_a = a_train[96 + n_val:96 + n_val + 320] * 2 - 1  # the fitness's recovery (disjoint from all)
    rec_b = b_train[96 + n_val:96 + n_val + 320] * 2 - 1
    n_cal = 128 if q else 256
    calib_a, calib_b = [a_train[:n_cal] * 2 - 1], [b_train[:n_cal] * 2 - 1]
    # full run: the uniform L1 seed is member 0 (the dense member repairs to about it); --quick keeps the dense
    # member (population 5 without it left 2x's margin at 0.0001 for fine-tuning seed 0)
    cfg = Evolve(population=6 if q else 12, budget=12 if q else 96, tournament=3, mutation=0.03, elite=2,
                 init_dense=q, seed=0)
    rec_steps = 5 if q else 10
    ft_steps = 40 if q else 200
    example = fit_a[:1]
    dense_macs, dense_params = measure(G0, example).total_macs, sum(p.numel() for p in G0.parameters())
    s0 = translation_scores(G0, F0, a_test, clf, y_test)
    lat0 = time_model(G0, fit_a[:64] if len(fit_a) >= 64 else a_test[:64] * 2 - 1, clock="cpu", warmup=1,
                      min_run_time=0.1).median_ms
    print(f"dense pair: G {dense_macs / 1e6:.2f}M MACs, {dense_params} params per generator; "
          f"l1_G {s0['l1_G']:.4f} l1_F {s0['l1_F']:.4f} acc(F(b)) {s0['acc_F']:.2%} acc(1-G(a)) {s0['acc_G']:.2%}; "
          f"{lat0:.1f} ms/64")
    if q:
        print("--quick: co-evolution and uniform L1 only (the bound's arms); evolution alone, L1 budget-filled and "
              "OBS-reconstruction pruning run in the full run only")
    head = ["budget, method", "G MACs", "F MACs", "params G+F", "l1_G", "l1_F", "acc F", "acc G", "| +FT l1_G",
            "l1_F", "acc F", "acc G", "ms/64", "search s"]
    fmt = "{:<24} {:>7} {:>7} {:>10} {:>6} {:>6} {:>6} {:>6} {:>10} {:>6} {:>6} {:>6} {:>6} {:>8}"
    print(fmt.format(*head))
    results, widths = {}, {}
    ft_cache = {}  # every arm's fine-tuning reads the same batches: the teachers run once per step
    targets = [1 / k for k in sorted(set(args.budget or (2, 4, 8)))]
    for target in targets:
        arms = {}
        t = time.process_time()
        Gs, Fs = copy.deepcopy(G0), copy.deepcopy(F0)
        space_g, space_f = ChannelSpace(Gs, example), ChannelSpace(Fs, example)
        l1_g, keep_g = l1_at_budget(space_g, target)
        l1_f, keep_f = l1_at_budget(space_f, target)
        arms["uniform L1"] = (l1_g, l1_f, 0.0)
        rep_g, rep_f = space_g.budget_repair(target), space_f.budget_repair(target)
        rc_g = Recovery(space_g, rec_a, steps=rec_steps, calib=bn_a)  # shared by both GAs (a cache per genome)
        rc_f = Recovery(space_f, rec_b, steps=rec_steps, calib=bn_b)
        if not q:  # the full run only: the GAs' seed after the repair, and each generator's GA alone
            t = time.process_time()
            arms["L1 budget-filled"] = (rep_g(l1_g), rep_f(l1_f), 0.0)
            fg = generator_fitness(space_g, D_B, fit_a, target, recovery=rc_g, beta=0.0)
            ff = generator_fitness(space_f, D_A, fit_b, target, recovery=rc_f, beta=0.0)
            vg = generator_fitness(space_g, D_B, val_a, target, recovery=rc_g, beta=0.0)  # held-out re-selection
            vf = generator_fitness(space_f, D_A, val_b, target, recovery=rc_f, beta=0.0)
            ga_g = GeneticSearch(cfg, space_g.segments, [l1_g], repair=rep_g)
            ga_g.run(lambda g, fg=fg: fg(g, None))
            ga_f = GeneticSearch(cfg, space_f.segments, [l1_f], repair=rep_f)
            ga_f.run(lambda g, ff=ff: ff(g, None))
            alone_g = ga_g.reselect(lambda g, vg=vg: vg(g, None))
            alone_f = ga_f.reselect(lambda g, vf=vf: vf(g, None))
            arms["evolution alone"] = (alone_g.genome, alone_f.genome, time.process_time() - t)
        kw_g = dict(partner=space_f, recovery=rc_g, partner_recovery=rc_f, beta=0.0)
        kw_f = dict(partner=space_g, recovery=rc_f, partner_recovery=rc_g, beta=0.0)
        fgc = generator_fitness(space_g, D_B, fit_a, target, **kw_g)
        ffc = generator_fitness(space_f, D_A, fit_b, target, **kw_f)
        vgc = generator_fitness(space_g, D_B, val_a, target, **kw_g)
        vfc = generator_fitness(space_f, D_A, val_b, target, **kw_f)
        t = time.process_time()
        co_g, co_f = coevolve(fgc, ffc, space_g.segments, space_f.segments, cfg, seeds_a=[l1_g], seeds_b=[l1_f],
                              repair_a=rep_g, repair_b=rep_f, final_a=vgc, final_b=vfc)
        arms["co-evolution"] = (co_g.genome, co_f.genome, time.process_time() - t)
        print(f"  ({1 / target:.0f}x: {rc_g.trained} + {rc_f.trained} candidates recovered)", flush=True)
        obs = [] if q else [("OBS-recon pruning", (None, None, 0.0))]
        for label, (gg, gf, secs) in list(arms.items()) + obs:
            G, F_ = copy.deepcopy(G0), copy.deepcopy(F0)
            if gg is not None:
                ChannelSpace(G, example).prune_(gg)
                ChannelSpace(F_, example).prune_(gf)
            else:
                t = time.process_time()
                bs.prune_(G, bs.ChannelPruning(ratio=1 - keep_g, reconstruct="obs"), example_inputs=example,
                          calib=calib_a)
                bs.prune_(F_, bs.ChannelPruning(ratio=1 - keep_f, reconstruct="obs"), example_inputs=example,
                          calib=calib_b)
                secs = time.process_time() - t
            before = translation_scores(G, F_, a_test, clf, y_test)
            finetune_pair_(G, F_, G0, F0, a_train, b_train, ft_steps, seed=args.ft_seed, cache=ft_cache)
            after = translation_scores(G, F_, a_test, clf, y_test)
            mg, mf = measure(G, example).total_macs, measure(F_, example).total_macs
            params = sum(p.numel() for p in G.parameters()) + sum(p.numel() for p in F_.parameters())
            lat = time_model(G, a_test[:64] * 2 - 1, clock="cpu", warmup=1, min_run_time=0.1).median_ms
            results[(target, label)] = after["l1_G"] + after["l1_F"]
            print(fmt.format(f"{1 / target:.0f}x {label}", f"{mg / 1e6:.2f}M", f"{mf / 1e6:.2f}M", params,
                             f"{before['l1_G']:.4f}", f"{before['l1_F']:.4f}", f"{before['acc_F']:.1%}",
                             f"{before['acc_G']:.1%}", f"{after['l1_G']:.4f}", f"{after['l1_F']:.4f}",
                             f"{after['acc_F']:.1%}", f"{after['acc_G']:.1%}",
                             f"{lat:.1f}", f"{secs:.1f}"))
            if gg is not None:
                widths[(target, label)] = (space_g.split(gg), space_f.split(gf))
    print(f"  ({n_test} test images; GA population {cfg.population}, {cfg.budget} evaluations per generator "
          f"(co-evolution: the same per population), candidates scored after a {rec_steps}-step recovery; "
          f"fine-tuning {ft_steps} steps of 32 for every arm; {time.process_time() - t0:.0f} CPU s, "
          f"{time.perf_counter() - w0:.0f} s wall)")
    print("  channels kept per group (stem, down/residual, block 0, block 1, up), G | F:")
    for (target, label), (wg, wf) in widths.items():
        print(f"    {1 / target:.0f}x {label:<18} {[int(b.sum()) for b in wg]} | {[int(b.sum()) for b in wf]}")
    for target in targets:
        c, u = results[(target, "co-evolution")], results[(target, "uniform L1")]
        check(c < u, f"{1 / target:.0f}x: co-evolution l1_G + l1_F {c:.5f} < uniform L1 {u:.5f} after fine-tuning")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
