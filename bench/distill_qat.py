"""Parts ``kd`` and ``qat`` of bench/toolbox.py: KD vs plain fine-tuning of a channel-pruned model, QAT vs PTQ.

    python bench/toolbox.py --only kd,qat [--quick]      # or: python bench/distill_qat.py [--quick]

kd: the Fashion-MNIST CNN (``pretrained("fashion-cnn")``, MnistCNN trained on Fashion-MNIST, cached)
is narrowed to about half its MACs with ``brainsurgeon.prune.prune_`` (ChannelPruning, 32 % of every
coupled channel group by group L2 norm; fc2's class outputs kept), then fine-tuned with plain
cross-entropy and with Hinton KD from its dense self, paired by seed (same batch order, augmented views,
optimizer, lr schedule and epochs; the arms differ only in the loss), each with and without function-
matching augmentation (``KD(shift=2, flip=True)``: teacher and student see the same shifted/mirrored
view; Beyer et al., CVPR 2022). Regimes: all 55k training labels for 1 epoch, and a fixed 6k of them
for 20 epochs. The best state on the 5k validation split is kept; per regime and loss the variant
(augmentation or not) with the higher mean *validation* accuracy is chosen, and its accuracy on the
10k test split is reported (mean, standard deviation over seeds, per seed) with the paired KD - plain
difference. The bound is checked in the 6k-label regime (see KD_REGIME).
qat: the MNIST CNN is quantized (every conv/linear, per-channel symmetric grids) with RTN and GPTQ at
4/3/2 bits; QAT starts from the GPTQ weights (the grid is read back from them, so the first QAT forward
equals the GPTQ model's), distils from the dense model, and is converted back onto its grid (checked:
<= 2^b levels per row) and packed (``convert_qat_(packed=True, compute_dtype="float32")``: int4/int8
weight-only Linear kernels, PackedConv2d storage); "packed" is that model's accuracy.
quick: kd on a fixed 6k of the training labels for 1 epoch (47 steps), one seed, no augmentation,
the first 1k of validation and 2k of test; qat at 4 bits only, 6k training images.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.data import Subset

import brainsurgeon as bs
from brainsurgeon.distill import KD, distill
from brainsurgeon.models import calibration_loader, evaluate, load_fashion_mnist_splits, load_mnist_splits, pretrained
from brainsurgeon.quant.qat import QAT, convert_qat_, prepare_qat_

# Every setting below was chosen on the 5k validation split only (mean of seeds 0-2; test never looked at).
# Validation accuracy of the pruned model after fine-tuning (dense: 92.10 %):
#   55k labels, 1 ep:  plain lr 1e-3 91.80, lr 3e-3 91.95 | KD T2/a.5 lr 1e-3 91.97, lr 3e-3 91.92;
#                      KD T1/a1 91.89, T4/a.9 91.57, T1/a.5 (lr 3e-3) 91.99.
#   55k labels, 3 ep, augmented, lr 3e-3: plain 91.38, KD 91.83.
#   6k labels, 10 ep:  plain 90.88 (lr 3e-3: 90.57), augmented 90.49 (lr 3e-3: 90.34);
#                      KD 91.61 (lr 3e-3: 91.63), augmented 91.75 (lr 3e-3: 91.80); KD alpha=1 augmented 91.61;
#                      KD augmented + a FitNets hint at conv3 (learnable adapter, weight 1) 91.75 (no gain).
#   6k labels, 20 ep, augmented: plain 90.70, KD 91.93 -- KD gains with epochs (Beyer's "patient teacher"),
#                      so the bound is checked at 20 epochs.
# So: T=2, alpha=0.5, Adam lr 1e-3 (plain's best; KD is flat in lr) with a cosine schedule for both arms;
# augmentation shift 2 px + mirror (Fashion-MNIST clothes are left-right symmetric).
KD_ARM = {"temperature": 2.0, "alpha": 0.5}
LR = 1e-3
AUG = {"shift": 2, "flip": True}
# (name, labelled training images (0: all 55k), epochs, seeds, augmentation variants tried); the bound is
# checked in KD_REGIME.
REGIMES = [("55k labels, 1 ep", 0, 1, [0, 1, 2, 3, 4], (False, True)),
           ("6k labels, 20 ep", 6000, 20, [0, 1, 2, 3, 4], (False, True))]
QUICK_REGIME = ("6k labels, 1 ep", 6000, 1, [0], (False,))  # 47 steps per arm; aug: tests/distill
KD_REGIME = 1  # index in REGIMES
# Full run (5 seeds, test): at 6k/20 ep KD beats plain by 0.66 pt on 5/5 seeds but ends 0.96 pt below dense, so the
# within-0.5-pt part fails; at 55k/1 ep KD ties plain (+0.05 +- 0.08). Validation overstates the fine-tuned models
# by 0.4-0.9 pt (best-of-epochs selection), so settings that looked 0.2-0.35 pt from dense on val are not on test.


def subsets(train, val, test, quick: bool, n_test: int):
    """The data of a quick run: a fixed random 6k of train, the first 1k of val and n_test of test."""
    if not quick:
        return train, val, test
    return few_labels(train), Subset(val, range(1000)), Subset(test, range(n_test))


def few_labels(train, n: int = 6000):
    """A fixed random n of the training images (the same for every arm and seed)."""
    g = torch.Generator().manual_seed(0)
    return Subset(train, torch.randperm(len(train), generator=g)[:n].tolist())


def prune_channels(dense: nn.Module, ratio: float) -> nn.Module:
    """A copy of `dense` with `ratio` of every coupled channel group removed by brainsurgeon.prune."""
    from brainsurgeon.prune import ChannelPruning, prune_

    m = copy.deepcopy(dense)
    prune_(m, ChannelPruning(ratio=ratio, importance="group_l2", ignore=("fc2",)),
           example_inputs=torch.zeros(1, 1, 28, 28))
    return m.eval()


def macs(model: nn.Module) -> int:
    """Multiply-accumulates of one 28x28 image (FLOPs / 2 from torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(torch.zeros(1, 1, 28, 28))
    return fc.get_total_flops() // 2


def _stats(accs: list[float]) -> tuple[float, float]:
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def _run(pruned: nn.Module, dense: nn.Module, train, val, test, epochs: int, seeds: list[int], kd: bool,
         aug: bool) -> tuple[list[float], list[float]]:
    """(validation, test) accuracy per seed of one arm; the seed sets batch order and views, the same for all arms."""
    vals, tests = [], []
    for seed in seeds:
        s = copy.deepcopy(pruned)
        cfg = KD(epochs=epochs, lr=LR, seed=seed, **(KD_ARM if kd else {}), **(AUG if aug else {}))
        hist = distill(s, dense if kd else None, train, cfg, val=val)
        vals.append(hist.best_metric)
        tests.append(evaluate(s, test))
    return vals, tests


def _pct(accs: list[float]) -> str:
    return " ".join(f"{100 * a:.2f}" for a in accs)


def kd_vs_finetune(b) -> None:
    dense, _, _ = pretrained("fashion-cnn")
    train, val, test = load_fashion_mnist_splits()
    if b.quick:
        val, test = Subset(val, range(1000)), Subset(test, range(2000))
    regimes = [QUICK_REGIME] if b.quick else REGIMES
    print(f"structured-pruned Fashion-MNIST CNN: plain CE vs KD (T={KD_ARM['temperature']:g}, "
          f"alpha={KD_ARM['alpha']:g}, teacher: its dense self) fine-tuning, paired by seed (Adam lr {LR:g}, cosine, "
          f"batch 128; aug = shift {AUG['shift']} px + mirror, the same view for teacher and student); best state on "
          f"{len(val)} val; variant chosen on val (*); {len(test)} test images")
    pruned = prune_channels(dense, 0.32)
    acc_dense, acc_pruned = evaluate(dense, test), evaluate(pruned, test)
    m_dense, m_pruned = macs(dense), macs(pruned)
    print(f"  dense: {m_dense:,} MACs, test {acc_dense:.2%} (val {evaluate(dense, val):.2%}); pruned (32 % channels): "
          f"{m_pruned:,} MACs ({m_pruned / m_dense:.2f}x), test {acc_pruned:.2%} before fine-tuning")
    rows, chosen, measured = [], {}, {}
    for name, n, epochs, seeds, variants in regimes:
        data = few_labels(train, n) if n else train
        runs = {(kd, aug): _run(pruned, dense, data, val, test, epochs, seeds, kd, aug)
                for kd in (False, True) for aug in variants}
        for kd in (False, True):  # per loss, the variant with the better mean validation accuracy
            chosen[(name, kd)] = max(variants, key=lambda aug, kd=kd: statistics.fmean(runs[(kd, aug)][0]))
        for (kd, aug), (vals, tests) in runs.items():
            mean, sd = _stats(tests)
            plain_tests = runs[(False, aug)][1]
            diff = [k - p for k, p in zip(tests, plain_tests, strict=True)]
            d_mean, d_sd = _stats(diff)
            mark = "*" if chosen[(name, kd)] == aug and len(variants) > 1 else ""
            rows.append([f"{name}, {'KD' if kd else 'plain CE'}{', aug' if aug else ''}{mark}",
                         f"{100 * statistics.fmean(vals):.2f}", f"{100 * mean:.2f}",
                         f"{100 * sd:.2f}" if len(seeds) > 1 else "-",
                         f"{100 * d_mean:+.2f} ± {100 * d_sd:.2f}" if kd else "", _pct(tests)])
        measured[name] = runs
    b.table(["regime, arm (* chosen on val)", "val", "test", "sd", "KD - plain (paired)", "test per seed"], rows,
            [32, 6, 6, 5, 19, 34])
    b.out["kd"] = {"rows": rows, "dense": acc_dense, "pruned": acc_pruned, "macs": [m_dense, m_pruned]}
    b.check(m_pruned <= 0.55 * m_dense, f"pruned MACs {m_pruned / m_dense:.2f}x <= 0.55x dense")
    name = regimes[0 if b.quick else KD_REGIME][0]
    runs = measured[name]
    kd_t, plain_t = runs[(True, chosen[(name, True)])][1], runs[(False, chosen[(name, False)])][1]
    kd, plain = statistics.fmean(kd_t), statistics.fmean(plain_t)
    wins = sum(k > p for k, p in zip(kd_t, plain_t, strict=True))
    tol = 0.015 if b.quick else 0.005
    b.check(kd >= acc_dense - tol, f"{name}: KD within {100 * tol:.1f} pt of dense ({kd:.2%} vs {acc_dense:.2%})")
    b.check(kd > plain and wins > len(kd_t) / 2,
            f"{name}: KD beats plain fine-tuning at equal epochs ({kd:.2%} vs {plain:.2%}, each with its "
            f"val-chosen variant; KD ahead on {wins}/{len(kd_t)} seeds)")


def levels_ok(model: nn.Module, bits: int) -> bool:
    """Every conv/linear row holds at most 2^bits distinct values."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            W = m.weight.detach().reshape(m.weight.shape[0], -1)
            if max(r.unique().numel() for r in W) > 2**bits:
                return False
    return True


def qat_vs_ptq(b) -> None:
    dense, _, _ = pretrained("mnist-cnn")
    train, val, test = subsets(*load_mnist_splits(), b.quick, 2000)
    bit_widths = (4,) if b.quick else (4, 3, 2)
    calib = calibration_loader(train, n=128 if b.quick else 512, batch_size=128)
    print(f"MNIST CNN, every conv/linear quantized per channel: RTN, GPTQ, and QAT (1 ep of KD from the dense model, "
          f"started from GPTQ); {len(train)} train, {len(test)} test images")
    acc_dense = evaluate(dense, test)
    rows, bounds = [], []
    for bits in bit_widths:
        rtn, gptq = copy.deepcopy(dense), copy.deepcopy(dense)
        bs.quantize_(rtn, bs.RTN(bits=bits), calib)
        bs.quantize_(gptq, bs.GPTQ(bits=bits), calib)
        qat = copy.deepcopy(gptq)
        t0 = time.process_time()
        cfg = KD(temperature=4.0, alpha=0.9, epochs=1, lr=5e-4, keep_zeros=False, qat=QAT(bits=bits, init="grid"))
        hist = distill(qat, dense, train, cfg, val=val)
        sec = time.process_time() - t0
        packed = copy.deepcopy(qat)  # the grid is read back from the on-grid weights, then packed
        prepare_qat_(packed, QAT(bits=bits, init="grid"))
        convert_qat_(packed, packed=True, compute_dtype="float32")  # int4/int8 weight-only Linear, PackedConv2d
        a_rtn, a_gptq, a_qat, a_pk = (evaluate(m, test) for m in (rtn, gptq, qat, packed))
        grid, gptq_val = levels_ok(qat, bits), evaluate(gptq, val)
        rows.append([bits, f"{acc_dense:.2%}", f"{a_rtn:.2%}", f"{a_gptq:.2%}", f"{a_qat:.2%}",
                     f"{hist.val_start:.4f}={gptq_val:.4f}", str(grid), f"{a_pk:.2%}", f"{sec:.0f}"])
        bounds += [(abs(hist.val_start - gptq_val) < 1e-9, f"{bits}-bit: QAT starts at the GPTQ model "
                                                            f"(val {gptq_val:.4f})"),
                   (a_qat >= max(a_rtn, a_gptq), f"{bits}-bit: QAT >= best PTQ ({a_qat:.2%} vs RTN {a_rtn:.2%}, "
                                                 f"GPTQ {a_gptq:.2%})"),
                   (grid, f"{bits}-bit: QAT weights on the grid after conversion"),
                   (abs(a_pk - a_qat) <= 0.001, f"{bits}-bit: packed QAT within 0.1 pt of fake-quant ({a_pk:.2%})")]
    b.table(["bits", "dense", "RTN", "GPTQ", "QAT", "QAT start=GPTQ (val)", "on grid", "packed", "CPU s"], rows,
            [4, 7, 7, 7, 7, 21, 7, 7, 5])
    b.out["qat"] = {"rows": rows}
    for ok, what in bounds:
        b.check(ok, what)


if __name__ == "__main__":
    from toolbox import main

    sys.exit(main(parts=("kd", "qat")))
