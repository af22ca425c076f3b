"""Distillation vs plain fine-tuning of a channel-pruned MNIST CNN, and QAT vs PTQ (RTN, GPTQ).

    python bench/distill_qat.py            # full run (~6 CPU-minutes, 1 thread; 3 seeds in (a))
    python bench/distill_qat.py --quick    # reduced run (~1 CPU-minute with cached weights); exit 1 if a bound fails

The first run trains and caches the dense CNN (about a minute). Quick mode uses 4k training
images, 1k validation and 5k test images, 1 epoch per arm, no hints arm, 4 and 2 bits.

(a) The pretrained MNIST CNN (brainsurgeon.models, 2 epochs) is narrowed to about half its
MACs with ``brainsurgeon.prune.prune_`` (ChannelPruning, ratio 0.32, group L2 importance over
the dependency graph's coupled groups; fc2's class outputs kept), or with ``--slice`` by
plain torch slicing of the channels / hidden units of largest filter L2 norm. The narrowed
student is then fine-tuned for the same epochs with the same optimizer, once with plain
cross-entropy and once with Hinton KD from the dense teacher (and once with KD + FitNets
hints through 1x1 adapters), for several seeds (shuffle orders). Best state by accuracy on
the 10k validation split; accuracy reported on the 10k test split (mean over seeds).
(b) The dense CNN is quantized (every conv/linear, per-channel symmetric grids) with RTN and
GPTQ at 4/3/2 bits; QAT starts from the GPTQ weights (the grid is read back from them, so
the first QAT forward equals the GPTQ model's) and distils from the dense model, then the
weights are converted back onto their grid (checked: <= 2^b levels per row) and packed
(``convert_qat_(packed=True)``: int4/int8 weight-only Linear kernels with bfloat16
activations, PackedConv2d storage); "packed" is that model's test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn
from torch.utils.data import Subset

import brainsurgeon as bs
from brainsurgeon.distill import KD, distill
from brainsurgeon.models import calibration_loader, evaluate, load_mnist_splits, pretrained
from brainsurgeon.quant.qat import QAT, convert_qat_, prepare_qat_

# ----------------------------------------------------------------------------- pruning by slicing


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


@torch.no_grad()
def slice_channels(dense: nn.Module, keep: float) -> nn.Module:
    """A narrowed MnistCNN: conv1-3 out channels and fc1 units of largest L2 norm, physically removed."""
    m = copy.deepcopy(dense)
    idx_in = torch.arange(1)
    for conv, bn in ((m.conv1, m.bn1), (m.conv2, m.bn2), (m.conv3, m.bn3)):
        W = conv.weight[:, idx_in]  # (out, kept in, 3, 3)
        idx = _top(W.flatten(1).norm(dim=1), max(1, round(keep * W.shape[0])))
        new = nn.Conv2d(len(idx_in), len(idx), 3, padding=1, bias=False)
        new.weight.copy_(W[idx])
        nb = nn.BatchNorm2d(len(idx))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(nb, name).copy_(getattr(bn, name)[idx])
        setattr(m, [k for k, v in m.named_children() if v is conv][0], new)
        setattr(m, [k for k, v in m.named_children() if v is bn][0], nb)
        idx_in = idx
    hw = 7 * 7  # fc1 columns are (channel, 7, 7) flattened
    cols = (idx_in[:, None] * hw + torch.arange(hw)).flatten()
    W1 = m.fc1.weight[:, cols]
    units = _top(W1.norm(dim=1), max(1, round(keep * W1.shape[0])))
    fc1 = nn.Linear(len(cols), len(units))
    fc1.weight.copy_(W1[units])
    fc1.bias.copy_(m.fc1.bias[units])
    fc2 = nn.Linear(len(units), m.fc2.out_features)
    fc2.weight.copy_(m.fc2.weight[:, units])
    fc2.bias.copy_(m.fc2.bias)
    m.fc1, m.fc2 = fc1, fc2
    return m.eval()


def prune_channels(dense: nn.Module, ratio: float) -> nn.Module:
    """A copy of `dense` with `ratio` of every coupled channel group removed by brainsurgeon.prune."""
    from brainsurgeon.prune import prune_
    from brainsurgeon.prune.config import ChannelPruning

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


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the two studies


def kd_vs_finetune(dense, train, val, test, epochs, hints, seeds, use_slice):
    """Rows (name, MACs, params, [test acc per seed], mean seconds) of part (a)."""
    rows = [("dense", macs(dense), params(dense), [evaluate(dense, test)], 0.0)]
    if use_slice:
        pruned, label = slice_channels(dense, 0.7), "sliced (top-L2 70% of channels)"
    else:
        pruned, label = prune_channels(dense, 0.32), "prune_ (32% of channels, group L2)"
    rows.append((label, macs(pruned), params(pruned), [evaluate(pruned, test)], 0.0))
    arms = [("plain fine-tune", None, {}), ("KD fine-tune (T=4, a=0.9)", dense, {})]
    if hints:
        arms.append(("KD + hints conv2/conv3", dense, {"hints": (("conv2", "conv2"), ("conv3", "conv3"))}))
    for name, teacher, kw in arms:
        accs, secs = [], []
        for seed in seeds:  # the seed sets the shuffle order; the pruned start is the same
            s = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            distill(s, teacher, train, KD(temperature=4.0, alpha=0.9, epochs=epochs, lr=1e-3, seed=seed, **kw),
                    val=val)
            secs.append(time.perf_counter() - t0)
            accs.append(evaluate(s, test))
        rows.append((f"{name}, {epochs} ep", macs(s), params(s), accs, sum(secs) / len(secs)))
    return rows


def levels_ok(model: nn.Module, bits: int) -> bool:
    """Every conv/linear row holds at most 2^bits distinct values."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            W = m.weight.detach().reshape(m.weight.shape[0], -1)
            if max(r.unique().numel() for r in W) > 2**bits:
                return False
    return True


def qat_vs_ptq(dense, train, val, test, bit_widths, epochs, n_calib):
    """Rows (bits, RTN, GPTQ, QAT start (val), GPTQ (val), QAT, on grid, packed QAT, QAT seconds) of (b)."""
    calib = calibration_loader(train, n=n_calib, batch_size=128)
    rows = []
    for bits in bit_widths:
        rtn, gptq = copy.deepcopy(dense), copy.deepcopy(dense)
        bs.quantize_(rtn, bs.RTN(bits=bits), calib)
        bs.quantize_(gptq, bs.GPTQ(bits=bits), calib)
        qat = copy.deepcopy(gptq)
        t0 = time.perf_counter()
        cfg = KD(temperature=4.0, alpha=0.9, epochs=epochs, lr=5e-4, keep_zeros=False, qat=QAT(bits=bits, init="grid"))
        hist = distill(qat, dense, train, cfg, val=val)
        sec = time.perf_counter() - t0
        packed = copy.deepcopy(qat)  # the grid is read back from the on-grid weights, then packed
        prepare_qat_(packed, QAT(bits=bits, init="grid"))
        convert_qat_(packed, packed=True)  # int4/int8 weight-only Linear kernels, PackedConv2d
        rows.append((bits, evaluate(rtn, test), evaluate(gptq, test), hist.val_start, evaluate(gptq, val),
                     evaluate(qat, test), levels_ok(qat, bits), evaluate(packed, test), sec))
    return rows


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run; exit 1 when a stated bound fails")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--seeds", type=int, default=0, help="fine-tuning seeds in (a) (default: 3, quick: 1)")
    ap.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs in (a) (default: 1)")
    ap.add_argument("--slice", action="store_true", help="narrow by plain L2 slicing instead of brainsurgeon.prune")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dense, _, _ = pretrained("mnist-cnn")
    train, val, test = load_mnist_splits()
    if args.quick:  # a fixed random 4k of train, the first 1k of val and 5k of test
        g = torch.Generator().manual_seed(0)
        train = Subset(train, torch.randperm(len(train), generator=g)[:4000].tolist())
        val, test = Subset(val, list(range(1000))), Subset(test, list(range(5000)))
    epochs_a, epochs_b = args.epochs or 1, 1
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    bit_widths = (4, 2) if args.quick else (4, 3, 2)
    n_calib = 256 if args.quick else 512

    print(f"(a) channel-pruned MNIST CNN: plain vs KD fine-tuning at equal epochs ({len(train)} train "
          f"images, best of {len(val)} val, accuracy on {len(test)} test, mean of seeds {seeds})")
    rows_a = kd_vs_finetune(dense, train, val, test, epochs_a, not args.quick, seeds, args.slice)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{'model':<36} {'MACs':>9} {'params':>8} {'test acc':>9} {'per seed':>24} {'sec':>6}")
    for name, mc, pc, accs, sec in rows_a:
        per = " ".join(f"{a:.2%}" for a in accs) if len(accs) > 1 else ""
        print(f"{name:<36} {mc:>9,} {pc:>8,} {mean(accs):>9.2%} {per:>24} {sec:>6.1f}")
    dense_acc, dense_macs = rows_a[0][3][0], rows_a[0][1]
    plain_acc, kd_acc, pruned_macs = mean(rows_a[2][3]), mean(rows_a[3][3]), rows_a[1][1]

    print(f"\n(b) QAT (KD from the dense model, {epochs_b} ep, from GPTQ) vs PTQ, every conv/linear quantized")
    rows_b = qat_vs_ptq(dense, train, val, test, bit_widths, epochs_b, n_calib)
    print(f"{'bits':>4} {'dense':>7} {'RTN':>7} {'GPTQ':>7} {'QAT':>7} {'QAT start=GPTQ (val)':>21} "
          f"{'on grid':>7} {'packed':>7} {'sec':>6}")
    for bits, rtn, gptq, start, gptq_val, qat, grid, pk, sec in rows_b:
        print(f"{bits:>4} {dense_acc:>7.2%} {rtn:>7.2%} {gptq:>7.2%} {qat:>7.2%} "
              f"{f'{start:.4f}={gptq_val:.4f}':>21} {str(grid):>7} {pk:>7.2%} {sec:>6.1f}")

    tol_kd = 0.01 if args.quick else 0.005
    bounds = [
        (f"pruned MACs <= 0.55x dense ({pruned_macs / dense_macs:.2f}x)", pruned_macs <= 0.55 * dense_macs),
        (f"KD within {tol_kd:.1%} of dense ({kd_acc:.2%} vs {dense_acc:.2%})", kd_acc >= dense_acc - tol_kd),
        # quick: one seed on 5k test images (std of an accuracy near 98% is 0.2 pt): KD may not trail
        # plain fine-tuning by more than that noise; full: mean over seeds on 10k images, KD >= plain
        (f"KD >= plain fine-tune{' - 0.3 pt (one seed)' if args.quick else ''} ({kd_acc:.2%} vs {plain_acc:.2%})",
         kd_acc >= plain_acc - (0.003 if args.quick else 0.0)),
    ]
    for bits, rtn, gptq, start, gptq_val, qat, grid, pk, _ in rows_b:
        bounds.append((f"{bits}-bit: QAT starts at the GPTQ model (val {start:.4f} = {gptq_val:.4f})",
                       abs(start - gptq_val) < 1e-9))
        bounds.append((f"{bits}-bit: QAT >= best PTQ ({qat:.2%} vs RTN {rtn:.2%}, GPTQ {gptq:.2%})",
                       qat >= max(rtn, gptq)))
        bounds.append((f"{bits}-bit: QAT weights on the grid after conversion", grid))
        bounds.append((f"{bits}-bit: packed QAT model within 0.1 pt of fake-quant ({pk:.2%} vs {qat:.2%})",
                       abs(pk - qat) <= 0.001))
    print()
    for text, ok in bounds:
        print(f"[{'ok' if ok else 'FAIL'}] {text}")
    print(f"total {time.perf_counter() - t_start:.0f}s wall, {time.process_time():.0f}s CPU "
          f"({args.threads} thread{'s' if args.threads > 1 else ''})")
    return 0 if all(ok for _, ok in bounds) else 1


if __name__ == "__main__":
    sys.exit(main())
