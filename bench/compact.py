"""Compact-design transforms (``bs.transform_`` with ``bs.Separable``): data-aware vs weight-space fitting,
vs channel pruning and Tucker-2 at the same MACs, before and after KD, with measured CPU latency.

    python bench/compact.py --quick    # MNIST CNN (2x, 4x) and the MobileNetV2 stem (2x, no KD); about a minute
    python bench/compact.py            # + Fashion-MNIST ResNet-20, KD on every arm, more images, 4x on MobileNetV2
    python bench/compact.py --only resnet --budgets 2          # one piece of the full run (each under ~10 min)

Budgets: each transformed conv keeps 1/2 or 1/4 of its weights (``Separable(ratio=...)``; at stride 1 the
same fraction of its MACs); the whole model's MACs are measured (``prune.costs.measure``, one image).
Designs: spatial (k x 1 then 1 x k, Jaderberg et al. 2014), depthwise (depthwise k x k with m filters per
channel, then 1x1, MobileNets), bottleneck (1x1, k x k, 1x1); each fitted weight-space (closed-form SVD /
HOOI) or data-aware (ALS on the layer outputs over the calibration images, from the weight-space fit).
Peers at the same budget: ``factorize_`` Tucker-2 (``LowRank(param_ratio=ratio)``, HOOI: the weight-space
bottleneck through the older verb, its ranks chosen by the verb) and ``prune_`` channel pruning (group L2,
the same fraction of the channels of every group; the fraction found by bisection so the pruned model has at
most the mean MACs of the three designs at that budget). KD: the existing ``distill`` loop from the dense
model, the same steps, data and seed for every arm it runs on: the data-aware designs and the two peers, and
also the weight-space fits in the full MNIST run (the bound's ablation; too slow for the bigger models here).

MNIST CNN (``pretrained("mnist-cnn")``): conv2 and conv3 (conv1 has one input channel); accuracy on MNIST
test images; KD on the training set. ResNet-20 (``pretrained("fashion-resnet20")``, full run only): its 18
block 3x3 convs on Fashion-MNIST. MobileNetV2 (ImageNet weights; its only non-depthwise k x k conv is the stem,
32x3x3x3, 3.6 % of the MACs): top-1 agreement with the dense model ("acc" = agreement) and KL on crops of real
photos (``bench/_vision.py``); channel pruning prunes the stem's channel group (stem, the first block's
depthwise conv and the input of its 1x1 projection); no labelled ImageNet data ships, so KD is a short
distillation on the unlabelled calibration crops (other photos than the evaluation crops; random flips, teacher
and student on the same view) that trains the stem and the first block only (the layers the arms change)
with every BatchNorm's running statistics frozen.

Bound (fixed before the first run): at every (model, design, budget) the data-aware fit's output error
vs the dense model -- mean squared logit difference on held-out images, before KD -- is below the
weight-space fit's. Exit 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

import brainsurgeon as bs
from brainsurgeon.distill import KD, distill
from brainsurgeon.models import calibration_loader, load_fashion_mnist_splits, pretrained
from brainsurgeon.prune.costs import measure
from brainsurgeon.quant.measure import time_model

KINDS = ("spatial", "depthwise", "bottleneck")
ARMS = (*KINDS, "tucker2", "prune")
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILED.append(what)


def table(head: list[str], rows: list[list[str]], widths: list[int]) -> None:
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*r))


class CachedTeacher(nn.Module):
    """The dense model as a KD teacher whose outputs are remembered by input (a digest of its bytes): every arm
    distils on the same batches (one seed), so the teacher runs once per batch for the whole bench, not per arm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.memo = model, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), hashlib.blake2b(x.detach().contiguous().numpy().tobytes()).digest())
        if key not in self.memo:
            self.memo[key] = self.model(x)
        return self.memo[key]


class FrozenBN(nn.Module):
    """`model` for fine-tuning with every BatchNorm kept in eval mode (running statistics frozen): distillation
    on a few unlabelled crops of a few photos must not replace ImageNet's statistics by the batch's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> FrozenBN:
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


@dataclass
class Task:
    """One model of the bench: what it is scored on, which convs the arms change, how it is distilled."""

    name: str
    dense: nn.Module
    x_test: torch.Tensor
    y_test: torch.Tensor  # labels, or the dense model's top-1 (then "acc" is top-1 agreement)
    calib: Any
    ignore: tuple[str, ...]  # convs the designs and Tucker-2 leave dense (regexes)
    prune_ignore: tuple[str, ...]  # layers channel pruning leaves alone
    kd_data: Any
    kd: KD | None  # None: no KD
    lat_x: torch.Tensor  # the batch whose CPU latency is timed
    lat_s: float
    kd_student: Callable[[nn.Module], nn.Module] = lambda m: m  # what distill trains (a freezing wrapper)
    options: bs.CalibOptions | None = None
    kd_note: str = ""


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    bs_ = 500 if x[0].numel() < 10_000 else 32  # MNIST-size images, or 224 x 224 crops
    return torch.cat([model(x[i:i + bs_]) for i in range(0, len(x), bs_)])


def design(task: Task, kind: str, ratio: float, aware: bool, calib: bool = True) -> Callable[[nn.Module], None]:
    """The transform; with calib also the weight-space fit sees the calibration data (to weight each output
    channel by its following BatchNorm's gamma/sigma); without it, only the design's structure is meant."""
    cfg = bs.Separable(kind=kind, ratio=ratio, data_aware=aware)
    data = task.calib if calib else None
    return lambda m: bs.transform_(m, cfg, calib=data, ignore=task.ignore, options=task.options)


def tucker2(task: Task, ratio: float) -> Callable[[nn.Module], None]:
    cfg = bs.LowRank(param_ratio=ratio, tucker_sweeps=2)
    fcs = tuple(re.escape(n) for n, m in task.dense.named_modules() if isinstance(m, nn.Linear))
    return lambda m: bs.factorize_(m, cfg, ignore=task.ignore + fcs)  # the designs' convs only


def prune(task: Task, p: float) -> Callable[[nn.Module], None]:
    cfg = bs.ChannelPruning(ratio=p, ignore=task.prune_ignore)
    return lambda m: bs.prune_(m, cfg, example_inputs=task.x_test[:1])


def macs_of(task: Task, fn: Callable[[nn.Module], None]) -> int:
    m = copy.deepcopy(task.dense)
    fn(m)
    return measure(m, task.x_test[:1]).total_macs


def prune_to_macs(task: Task, target: float) -> float:
    """The smallest channel-pruning ratio (group L2, per group) whose pruned model has at most `target` MACs,
    by bisection over ``prune_`` on copies (kept counts are integers, so the MACs land at or just under it)."""
    lo, hi = 0.0, 0.95
    for _ in range(8):  # to 0.4 % of the channels
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs_of(task, prune(task, mid)) <= target else (mid, hi)
    return hi


def run(task: Task, ratios: tuple[float, ...], arms: tuple[str, ...], kd_all: bool) -> None:
    """Every arm at every budget: MACs, logit MSE / KL / accuracy before KD, accuracy after KD, latency."""
    z0 = logits(task.dense, task.x_test)
    teacher = CachedTeacher(task.dense).eval()
    c0 = measure(task.dense, task.x_test[:1]).total_macs
    acc0 = float((z0.argmax(1) == task.y_test).float().mean())
    lat0 = time_model(task.dense, task.lat_x, clock="cpu", warmup=1, min_run_time=task.lat_s).median_ms
    rows = [["dense", f"{c0 / 1e6:.2f}M", "", "", f"{acc0:.2%}", "", f"{lat0:.1f}", ""]]
    errs = {}
    steps = task.kd.max_steps if task.kd is not None else 0
    for ratio in ratios:
        todo: list[tuple[str, str, bool | None, Callable[[nn.Module], None]]] = []
        for kind in (a for a in arms if a in KINDS):
            todo += [(f"{kind} {'data-aware' if aware else 'weight-space'}", kind, aware,
                      design(task, kind, ratio, aware)) for aware in (False, True)]
        if "tucker2" in arms:
            todo.append(("Tucker-2 (factorize_)", "tucker2", None, tucker2(task, ratio)))
        if "prune" in arms:  # at the mean MACs of the three designs (their structure: any fit has the same MACs)
            target = sum(macs_of(task, design(task, k, ratio, False, calib=False)) for k in KINDS) / len(KINDS)
            p = prune_to_macs(task, target)
            todo.append((f"channel pruning {p:.0%}", "prune", None, prune(task, p)))
        for label, kind, aware, fn in todo:
            m = copy.deepcopy(task.dense)
            t = time.process_time()
            fn(m)
            fit_s = time.process_time() - t
            z = logits(m, task.x_test)
            errs[(ratio, kind, aware)] = mse = float(((z - z0) ** 2).mean())
            kl = float(F.kl_div(z.log_softmax(1), z0.log_softmax(1), log_target=True, reduction="batchmean"))
            acc = float((z.argmax(1) == task.y_test).float().mean())
            macs = measure(m, task.x_test[:1]).total_macs
            row = [f"{1 / ratio:.0f}x {label}", f"{macs / 1e6:.2f}M", f"{mse:.4f}", f"{kl:.4f}", f"{acc:.2%}"]
            if task.kd is not None and (kd_all or aware is not False):
                distill(task.kd_student(m), teacher, task.kd_data, task.kd)
                row.append(f"{float((logits(m, task.x_test).argmax(1) == task.y_test).float().mean()):.2%}")
            else:
                row.append("-")
            lat = time_model(m, task.lat_x, clock="cpu", warmup=1, min_run_time=task.lat_s).median_ms
            row += [f"{lat:.1f}", f"{fit_s:.1f}"]
            rows.append(row)
    kd = f"KD {steps} steps of {task.kd.batch_size} from dense{task.kd_note}" if task.kd is not None else "no KD"
    print(f"{task.name}: {len(task.x_test)} test images; logit MSE and KL vs dense before KD; {kd}; latency: "
          f"median CPU ms of a {len(task.lat_x)}-image batch, 1 thread; fit s: CPU s of the transform")
    head = ["budget, method", "MACs", "logit MSE", "KL", "acc", f"acc +KD{steps or ''}", f"ms/{len(task.lat_x)}"]
    table(head + ["fit s"], rows, [36, 8, 9, 7, 7, 10, 6, 6])
    for ratio in ratios:
        for kind in (a for a in arms if a in KINDS):
            a, w = errs[(ratio, kind, True)], errs[(ratio, kind, False)]
            check(a < w, f"{task.name} {1 / ratio:.0f}x {kind}: data-aware logit MSE {a:.4f} < weight-space {w:.4f}")


def mnist(quick: bool, kd: int | None) -> Task:
    dense, train, test = pretrained("mnist-cnn")
    n = 2000 if quick else 10000
    x_test, y_test = test.tensors[0][:n], test.tensors[1][:n]
    steps = (25 if quick else 200) if kd is None else kd
    # conv1 (1 input channel, 144 weights, 5% of the MACs) stays dense: a rank-1 design of it wrecks the model
    # whichever fit is used (first run: spatial 2x logit MSE 23.4 weight-space, 31.2 data-aware)
    cfg = KD(epochs=1, max_steps=steps, lr=1e-3, seed=0) if steps else None
    return Task("MNIST CNN (conv2, conv3)", dense, x_test, y_test, calibration_loader(train, n=256, batch_size=128),
                ("conv1",), ("conv1", r"fc.*"), train, cfg, x_test[:64], 0.1 if quick else 0.5)


def resnet(quick: bool, kd: int | None) -> Task:
    dense, _, _ = pretrained("fashion-resnet20")
    train, _val, test = load_fashion_mnist_splits()
    test = Subset(test, range(2000))
    x_test, y_test = (torch.stack(t) for t in zip(*(test[i] for i in range(len(test))), strict=True))
    steps = 100 if kd is None else kd
    ignore = (r"conv1", r".*shortcut.*", r"fc")  # the stem has 1 input channel; 1x1 shortcuts; classifier
    return Task("Fashion-MNIST ResNet-20 (18 block convs)", dense, x_test, torch.as_tensor(y_test),
                calibration_loader(train, n=256, batch_size=128), ignore, ignore,
                train, KD(epochs=1, max_steps=steps, lr=1e-3, seed=0) if steps else None, x_test[:64], 0.25)


def mobilenet(quick: bool, kd: int | None) -> Task:
    from _vision import crops, mobilenet_v2, photos

    net, imgs = mobilenet_v2(), photos()
    calib_x = crops(imgs[0::2], 32 if quick else 64, seed=1)  # calibration and evaluation photos differ
    eval_x = crops(imgs[1::2], 32 if quick else 128, seed=2)
    calib = [calib_x[i:i + 8] for i in range(0, len(calib_x), 8)]
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    stem_group = ("features.0.0", "features.1.conv.0.0")  # the stem and the depthwise conv of its channels
    steps = (0 if quick else 40) if kd is None else kd
    cfg = KD(epochs=math.ceil(steps / len(calib)), max_steps=steps, lr=3e-4, batch_size=8, flip=True,
             seed=0) if steps else None

    def first_layers(m: nn.Module) -> nn.Module:  # distil the stem and the first block, BN statistics frozen
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith(("features.0.", "features.1.")))
        return FrozenBN(m)

    return Task("MobileNetV2 stem features.0.0 (3->32, 3x3; ImageNet weights)", net, eval_x,
                logits(net, eval_x).argmax(1), calib, tuple(re.escape(n) for n in convs if n != "features.0.0"),
                tuple(re.escape(n) for n in convs if n not in stem_group) + (r"classifier.*",), calib,
                cfg, eval_x[:8], 0.1 if quick else 0.5, first_layers,
                bs.CalibOptions(mode="dense"),
                f" on the {len(calib_x)} calibration crops (stem + block 1 trained, lr 3e-4, flips, BN frozen)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (about a minute); exit 1 if a bound fails")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="mnist,mobilenet,resnet", help="comma-separated of mnist, mobilenet, resnet")
    ap.add_argument("--budgets", default=None, help="comma-separated MAC reductions of the changed convs "
                                                    "(default 2,4; --quick: 2,4 MNIST, 2 MobileNetV2)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated of {', '.join(ARMS)}")
    ap.add_argument("--kd", type=int, metavar="STEPS", default=None,
                    help="KD steps of every part (default: 25 quick / 200 MNIST, 100 ResNet-20, 40 MobileNetV2 "
                         "full; none for MobileNetV2 in --quick)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = tuple(args.arms.split(","))
    if not set(arms) <= set(ARMS):
        ap.error(f"--arms: {sorted(set(arms) - set(ARMS))} not among {ARMS}")
    budgets = tuple(1 / float(b) for b in args.budgets.split(",")) if args.budgets else None
    t0 = time.process_time()
    parts = [p for p in ("mnist", "mobilenet", "resnet") if p in args.only.split(",")]
    if args.quick and "resnet" in parts:
        parts.remove("resnet")
        print("(--quick: ResNet-20 is in the full run only)")
    for i, part in enumerate(parts):
        if i:
            print()
        task = {"mnist": mnist, "mobilenet": mobilenet, "resnet": resnet}[part](args.quick, args.kd)
        quick_mnv2 = args.quick and part == "mobilenet"
        t = time.process_time()
        run(task, budgets or ((0.5,) if quick_mnv2 else (0.5, 0.25)),
            tuple(a for a in arms if not (quick_mnv2 and a == "spatial")), kd_all=part == "mnist" and not args.quick)
        print(f"  ({part}: {time.process_time() - t:.0f} CPU s)")
    print(f"\n{time.process_time() - t0:.0f} CPU s; {len(FAILED)} bound(s) failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
