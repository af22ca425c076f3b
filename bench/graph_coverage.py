"""Structural-pruning coverage on torchvision: brainsurgeon's DependencyGraph vs Torch-Pruning, same run.

    python bench/graph_coverage.py --quick              # ~10 representative models; exit 1 if a bound fails
    python bench/graph_coverage.py                      # the 107 models (quantized_* and raft_* excluded)
    python bench/graph_coverage.py --models resnet50 swin_t --no-tp
    python bench/graph_coverage.py --chunk 0/4 --jsonl out/cov.jsonl   # a quarter of the sweep, appended

Every model: weights=None (weights_backbone=None for detection/segmentation), a small input
(1x3x64x64 where the model allows), 50 % of the channels of every prunable group removed by L2
magnitude (sum of squares over the whole group, DepGraph-style), the final prediction layers ignored.
Columns: ok (eval and train-mode forward after pruning, output shapes kept), params and MACs before/after,
build+prune seconds; the same for torch-pruning (MagnitudePruner, L2, same ratio and ignored layers).
Each model runs in a fresh subprocess (memory; both tools in it, ours first), with torch.set_num_threads(1).
Seconds are wall time of build + prune (ours: DependencyGraph + groups + L2 scores + verified prune;
torch-pruning: MagnitudePruner construction + step), not the model build, MAC counting or checks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = ["resnet50", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "googlenet",
         "resnext50_32x4d", "swin_t", "vit_b_32", "fcn_resnet50"]
HEADS = ("fc", "classifier", "head", "heads", "cls_logits", "bbox_pred", "box_predictor", "mask_fcn_logits",
         "kps_score_lowres", "bbox_reg", "predictor", "cls_score", "conv5_mask", "aux_classifier.4",
         "classifier.4", "score", "high_classifier", "low_classifier")


def all_models() -> list[str]:
    import torchvision
    return [m for m in torchvision.models.list_models() if not m.startswith(("quantized_", "raft_"))]


def family(name: str) -> str:
    import torchvision
    for fam, mod in (("detection", torchvision.models.detection), ("segmentation", torchvision.models.segmentation),
                     ("video", torchvision.models.video)):
        if name in torchvision.models.list_models(module=mod):
            return fam
    return "classification"


def build(name: str) -> Any:
    import torchvision
    fam = family(name)
    kw: dict[str, Any] = {"weights": None}
    if fam in ("detection", "segmentation"):
        kw["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=True, init_weights=True)
    return torchvision.models.get_model(name, **kw).eval()


def inputs(name: str) -> Any:
    import torch
    fam = family(name)
    g = torch.Generator().manual_seed(0)
    if fam == "detection":
        return ([torch.rand(3, 128, 128, generator=g)],)
    if fam == "video":
        if name.startswith("mvit"):
            return (torch.rand(1, 3, 16, 224, 224, generator=g),)
        if name == "s3d":
            return (torch.rand(1, 3, 8, 64, 64, generator=g),)
        return (torch.rand(1, 3, 4, 64, 64, generator=g),)
    if name.startswith(("vit_", "maxvit")):
        return (torch.rand(1, 3, 224, 224, generator=g),)
    if name == "inception_v3":
        return (torch.rand(2, 3, 96, 96, generator=g),)
    return (torch.rand(2 if fam == "classification" else 1, 3, 64, 64, generator=g),)


def head_modules(model: Any) -> list[Any]:
    """The final prediction layers: named heads plus every Linear/Conv whose width is the class count."""
    from torch import nn
    out = []
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            continue
        width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        last = n.split(".")[-1]
        if width in (1000, 400, 91, 21, 17) or last in HEADS or n in HEADS or "predictor" in n:
            out.append(m)
    return out


def count(model: Any, x: Any) -> tuple[int, int]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*x)
    return params, fc.get_total_flops() // 2


def train_forward_ok(model: Any, x: Any) -> bool:
    """One train-mode forward; mode and buffers (BN statistics) restored after."""
    import torch
    was = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        model.train()
        with torch.no_grad():
            model(*x)
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        model.train(was)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def run_ours(name: str) -> dict[str, Any]:
    import torch

    from brainsurgeon.graph import DependencyGraph
    model, x = build(name), inputs(name)
    p0, m0 = count(model, x)
    train_before = train_forward_ok(model, x)
    t0 = time.perf_counter()
    g = DependencyGraph(model, x, ignore=head_modules(model))
    t1 = time.perf_counter()
    groups = g.groups()
    chosen = []
    for grp in groups:
        score = torch.zeros(grp.n, dtype=torch.float64)
        for s in grp.slices:
            t = getattr(model.get_submodule(s.module), s.tensor).detach()
            flat = t.movedim(s.dim, 0).reshape(t.shape[s.dim], -1)
            score += flat.pow(2).sum(1)[s.idxs].sum(1).double()
        k = grp.n // 2
        if k:
            chosen.append(grp.select(torch.argsort(score)[:k]))
    failed = len(g.prune(chosen, skip_failed=True))
    t2 = time.perf_counter()
    p1, m1 = count(model, x)
    return {"build_s": t1 - t0, "prune_s": t2 - t1, "params": [p0, p1], "macs": [m0, m1], "groups": len(groups),
            "failed_groups": failed, "train_ok": (not train_before) or train_forward_ok(model, x),
            "trace_s": sum(t.seconds for t in g.traces)}


def run_tp(name: str) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    model, x = build(name), inputs(name)
    p0, m0 = count(model, x)
    train_before = train_forward_ok(model, x)
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, example_inputs=x if len(x) > 1 else x[0],
                                       importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                       ignored_layers=head_modules(model))
    pruner.step()
    t1 = time.perf_counter()
    with torch.no_grad():
        model.eval()
        model(*x)
    p1, m1 = count(model, x)
    return {"seconds": t1 - t0, "params": [p0, p1], "macs": [m0, m1],
            "train_ok": (not train_before) or train_forward_ok(model, x)}


def one(name: str, tool: str) -> dict[str, Any]:
    import torch
    torch.set_num_threads(1)
    out = {}
    for t in (("ours", "tp") if tool == "both" else (tool,)):
        torch.manual_seed(0)
        try:
            res = run_ours(name) if t == "ours" else run_tp(name)
            res["ok"] = bool(res["train_ok"])
            if not res["ok"]:
                res["error"] = "train-mode forward fails after pruning"
        except Exception as e:  # noqa: BLE001
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        out[t] = res
    return out


def run_subprocess(name: str, tool: str, timeout: float) -> dict[str, Any]:
    """Both tools in one fresh process (one torchvision import); {'ours': ..., 'tp': ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--tool", tool]
    err = None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        for line in reversed(p.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        err = f"crashed (rc={p.returncode}): {p.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        err = f"timeout > {timeout:.0f}s"
    return {t: {"ok": False, "error": err} for t in (("ours", "tp") if tool == "both" else (tool,))}


def fmt_row(name: str, ours: dict[str, Any], tp: dict[str, Any] | None) -> str:
    def side(r: dict[str, Any] | None, secs: float | None) -> str:
        if r is None:
            return f"{'-':>4} {'':>17} {'':>17} {'':>7}"
        if not r["ok"]:
            return f"{'ERR':>4} {r.get('error', '')[:44]:<44}"
        p, m = r["params"], r["macs"]
        return (f"{'ok':>4} {p[0] / 1e6:7.2f}->{p[1] / 1e6:7.2f}M {m[0] / 1e9:7.3f}->{m[1] / 1e9:7.3f}G "
                f"{secs:7.2f}")
    s_ours = ours.get("build_s", 0) + ours.get("prune_s", 0) if ours.get("ok") else None
    return f"{name:<38} {side(ours, s_ours)} | {side(tp, tp.get('seconds') if tp else None)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--models", nargs="*", help="explicit model names")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--chunk", default=None, help="i/n: run the i-th of n interleaved chunks of the list")
    ap.add_argument("--jsonl", default=None, help="append one JSON line per model to this file")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model and tool")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="ours", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.tool)))
        return 0
    names = a.models or (QUICK if a.quick else all_models())
    if a.chunk:
        i, n = (int(v) for v in a.chunk.split("/"))
        names = names[i::n]
    print(f"{'model':<38} {'ours':>4} {'params':>17} {'MACs':>17} {'sec':>7} | torch-pruning 1.6")
    rows = []
    for name in names:
        # one fresh process per tool: a crash or memory blow-up of one (Torch-Pruning's group expansion
        # on Swin) must not void the other's result
        ours = run_subprocess(name, "ours", a.timeout)["ours"]
        tp = None if a.no_tp else run_subprocess(name, "tp", a.timeout)["tp"]
        rows.append((name, ours, tp))
        print(fmt_row(name, ours, tp), flush=True)
        if a.jsonl:
            with open(a.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"model": name, "ours": ours, "tp": tp}) + "\n")
    ok = [r for r in rows if r[1]["ok"]]
    secs = [r[1]["build_s"] + r[1]["prune_s"] for r in ok]
    line = f"ours: {len(ok)}/{len(rows)} ok"
    if secs:
        line += f", median {statistics.median(secs):.2f}s, worst {max(secs):.2f}s"
    if not a.no_tp:
        tok = [r for r in rows if r[2] and r[2]["ok"]]
        tsecs = [r[2]["seconds"] for r in tok]
        line += f" | torch-pruning: {len(tok)}/{len(rows)} ok"
        if tsecs:
            line += f", median {statistics.median(tsecs):.2f}s, worst {max(tsecs):.2f}s"
    print(line)
    if a.quick:
        bad = [r[0] for r in rows if not r[1]["ok"]]
        slow = [s for s in secs if s > 10.0]
        if bad or slow:
            print(f"FAIL: not ok {bad}; over 10 s: {len(slow)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
