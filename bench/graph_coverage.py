"""Structural-pruning coverage on torchvision: brainsurgeon's DependencyGraph vs Torch-Pruning, same run.

    python bench/graph_coverage.py --quick              # ~10 representative models; exit 1 if a bound fails
    python bench/graph_coverage.py --full               # every model of torchvision.models.list_models()
    python bench/graph_coverage.py --models resnet50 swin_t --no-tp
    python bench/graph_coverage.py --full --out out/graph_coverage   # also writes results.jsonl/.csv/.md

Every model: weights=None (weights_backbone=None for detection/segmentation, and min/max_size=128 for
the R-CNN/RetinaNet/FCOS transforms; quantize=False for the quantizable models: their float form), a
small input (1x3x64x64 where the model allows, ViTs built for it; detection 3x128x128), 50 % of the
channels of every prunable group removed by L2 magnitude (sum of squares over the whole group,
DepGraph-style), the final prediction layers ignored. Columns: ok (eval and train-mode forward after
pruning, output shapes kept; detection models run train mode on synthetic box/mask/keypoint targets,
passed to ours as ``train_inputs``), params and MACs before/after, build+prune seconds; the same for
torch-pruning (MagnitudePruner, L2, same ratio and ignored layers).

Each tool runs in its own worker process (torch.set_num_threads(1)), models one after another, with a
timeout and a memory guard (resident set size) per model; a worker that passes either, or crashes, is
killed and replaced, so one model's failure never voids another's result. Seconds are *process CPU
time* of build + prune (ours: DependencyGraph + groups + L2 scores + verified prune; torch-pruning:
MagnitudePruner construction + step), not the model construction, MAC counting or checks; ``fwd`` is
the CPU time of one plain eval forward of the model. As in ``timeit``, Python's cyclic garbage collector
is paused while a tool runs (for both tools; memory is still freed by reference counting).
The tools alternate model by model (ours, then torch-pruning, each in its own warm worker), so both
tools' timings of a model are taken under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = ["resnet50", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "googlenet",
         "resnext50_32x4d", "swin_t", "vit_b_32", "fcn_resnet50"]
HEADS = ("fc", "classifier", "head", "heads", "cls_logits", "bbox_pred", "box_predictor", "mask_fcn_logits",
         "kps_score_lowres", "bbox_reg", "predictor", "cls_score", "conv5_mask", "aux_classifier.4",
         "classifier.4", "score", "high_classifier", "low_classifier")


def all_models() -> list[str]:
    """Every model torchvision lists (quantized_* built in float form, raft_* on two frames)."""
    import torchvision
    return list(torchvision.models.list_models())


def family(name: str) -> str:
    import torchvision
    for fam, mod in (("detection", torchvision.models.detection), ("segmentation", torchvision.models.segmentation),
                     ("video", torchvision.models.video), ("optical_flow", torchvision.models.optical_flow),
                     ("quantization", torchvision.models.quantization)):
        if name in torchvision.models.list_models(module=mod):
            return fam
    return "classification"


def build(name: str) -> Any:
    import torchvision
    fam = family(name)
    kw: dict[str, Any] = {"weights": None}
    if fam in ("detection", "segmentation"):
        kw["weights_backbone"] = None
    if fam == "detection" and not name.startswith("ssd"):
        kw.update(min_size=128, max_size=128)   # the R-CNN transform would upscale the input to 800 px
    if "rcnn" in name:   # every image keeps detections_per_img boxes: the mask/keypoint heads' MACs (run per
        kw["box_score_thresh"] = 0.0   # box) are then the same before and after pruning, not score-dependent
    if fam == "quantization":
        kw["quantize"] = False
    if name.startswith("vit_"):
        kw["image_size"] = _vit_size(name)      # built for a small input (a constructor argument)
    if name.removeprefix("quantized_") in ("googlenet", "inception_v3"):
        kw.update(aux_logits=True, init_weights=True)
    return torchvision.models.get_model(name, **kw).eval()


def _vit_size(name: str) -> int:
    """ViTs take ``image_size`` at construction: 4x4 patches of 16, 2x2 of 32, 8x8 of 14."""
    return 112 if name.endswith("_14") else 64


def inputs(name: str) -> Any:
    import torch
    fam = family(name)
    g = torch.Generator().manual_seed(0)
    if fam == "detection":
        return ([torch.rand(3, 128, 128, generator=g)],)
    if fam == "optical_flow":
        return (torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g))
    if fam == "video":
        if name.startswith("mvit"):
            return (torch.rand(1, 3, 16, 224, 224, generator=g),)
        if name == "s3d":   # its final pooling kernel (2, 7, 7) is fixed: 16 frames of 224 px at least
            return (torch.rand(1, 3, 16, 224, 224, generator=g),)
        return (torch.rand(1, 3, 4, 64, 64, generator=g),)
    if name.startswith("vit_"):
        return (torch.rand(1, 3, _vit_size(name), _vit_size(name), generator=g),)
    if name.startswith("maxvit"):
        return (torch.rand(1, 3, 224, 224, generator=g),)
    if name in ("inception_v3", "quantized_inception_v3"):   # the train-mode aux head needs 299 px (a 17 x 17 map)
        return (torch.rand(2, 3, 299, 299, generator=g),)
    # two images: a train-mode BatchNorm over one value per channel (DeepLab's pooled ASPP branch) refuses one
    return (torch.rand(2 if fam in ("classification", "quantization", "segmentation") else 1, 3, 64, 64, generator=g),)


def train_inputs(name: str) -> Any:
    """The inputs of a train-mode forward: for detection models the images plus targets, one box per image
    (and the mask or keypoints their heads train on); for every other family the eval inputs."""
    import torch
    if family(name) != "detection":
        return inputs(name)
    (images,) = inputs(name)
    t: dict[str, Any] = {"boxes": torch.tensor([[16.0, 24.0, 80.0, 100.0]]), "labels": torch.tensor([1])}
    if name.startswith("maskrcnn"):
        t["masks"] = torch.zeros(1, 128, 128, dtype=torch.uint8)
        t["masks"][0, 24:100, 16:80] = 1
    if name.startswith("keypointrcnn"):
        t["keypoints"] = torch.tensor([[[20.0 + 3 * i, 30.0 + 3 * i, 1.0] for i in range(17)]])
    return (images, [t] * len(images))


CLASSES = {"classification": (1000,), "quantization": (1000,), "video": (400,), "detection": (91, 17),
           "segmentation": (21,), "optical_flow": ()}


def head_modules(model: Any, name: str = "") -> list[Any]:
    """The final prediction layers: named heads plus every Linear/Conv whose width is the class count of
    the model's family (ImageNet 1000, Kinetics 400, COCO 91 / 17 keypoints, VOC 21; every count when
    ``name`` is not given) -- so a regnet_x_400mf stage of 400 channels is not taken for a head."""
    from torch import nn
    counts = CLASSES[family(name)] if name else tuple(c for v in CLASSES.values() for c in v)
    out = []
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            continue
        width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        last = n.split(".")[-1]
        if width in counts or last in HEADS or n in HEADS or "predictor" in n:
            out.append(m)
    return out


def count(model: Any, x: Any) -> tuple[int, int, list[tuple[int, ...]]]:
    """Parameters, MACs of one eval forward, and the output shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from brainsurgeon.graph.trace import flat_tensors
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(*x)
    return params, fc.get_total_flops() // 2, [tuple(t.shape) for t in flat_tensors(out)]


def shapes_kept(name: str, before: list[tuple[int, ...]], after: list[tuple[int, ...]]) -> bool:
    """Output shapes unchanged (detection: the number of boxes is data-dependent, so only ranks)."""
    if family(name) == "detection":
        return len(before) == len(after) and all(len(a) == len(b) for a, b in zip(before, after, strict=True))
    return before == after


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


def l2_half(model: Any, groups: list[Any]) -> list[Any]:
    """Half of every group's rows by L2 magnitude summed over the whole group (DepGraph's group norm)."""
    import torch

    from brainsurgeon.prune.importance import channel_norms
    mods = dict(model.named_modules(remove_duplicate=False))
    per_index: dict[tuple[str, str, int], torch.Tensor] = {}   # a tensor sits in many groups (DenseNet)
    chosen = []
    for grp in groups:
        score = torch.zeros(grp.n, dtype=torch.float64)
        for s in grp.slices:
            key = (s.module, s.tensor, s.dim)
            if key not in per_index:
                t = getattr(mods[s.module], s.tensor).detach()
                per_index[key] = channel_norms(t, s.dim, 2).double()
            score += per_index[key][s.idxs].sum(1)
        k = grp.n // 2
        if k:
            chosen.append(grp.select(torch.argsort(score)[:k]))
    return chosen


def run_ours(name: str) -> dict[str, Any]:
    """Build ``name``, prune 50 % of every group by L2 (heads ignored), verified; sizes, seconds, checks."""
    import torch

    from brainsurgeon.graph import DependencyGraph
    model, x, tx = build(name), inputs(name), train_inputs(name)
    p0, m0, s0 = count(model, x)            # (also the warm-up for the forward timing)
    with torch.no_grad():
        t0 = time.process_time()
        model(*x)
        fwd_s = time.process_time() - t0
    train_before = train_forward_ok(model, tx)
    t0 = time.process_time()
    g = DependencyGraph(model, x, ignore=head_modules(model, name), train_inputs=tx)
    t1 = time.process_time()
    groups = g.groups()
    failed = len(g.prune(l2_half(model, groups), skip_failed=True))
    t2 = time.process_time()
    p1, m1, s1 = count(model, x)
    return {"build_s": t1 - t0, "prune_s": t2 - t1, "seconds": t2 - t0, "params": [p0, p1], "macs": [m0, m1],
            "groups": len(groups), "failed_groups": failed, "train_before": train_before,
            "train_ok": (not train_before) or train_forward_ok(model, tx), "shape_ok": shapes_kept(name, s0, s1),
            "fwd_s": fwd_s}


def run_tp(name: str) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    model, x, tx = build(name), inputs(name), train_inputs(name)
    p0, m0, s0 = count(model, x)
    train_before = train_forward_ok(model, tx)
    t0 = time.process_time()
    pruner = tp.pruner.MagnitudePruner(model, example_inputs=x if len(x) > 1 else x[0],
                                       importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                       ignored_layers=head_modules(model, name))
    pruner.step()
    t1 = time.process_time()
    with torch.no_grad():
        model.eval()
        model(*x)
    p1, m1, s1 = count(model, x)
    return {"seconds": t1 - t0, "params": [p0, p1], "macs": [m0, m1], "train_before": train_before,
            "train_ok": (not train_before) or train_forward_ok(model, tx), "shape_ok": shapes_kept(name, s0, s1)}


def one(name: str, tool: str) -> dict[str, Any]:
    """One tool on one model in this process (1 thread); never raises. The cyclic garbage collector is
    paused while the tool runs (as ``timeit`` does), for both tools: a full collection of the ~340k
    objects torch and torchvision leave in a worker costs ~0.15 s and would land on whichever model
    happens to trigger it."""
    import gc

    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gc.collect()
    gc.disable()
    try:
        res = run_ours(name) if tool == "ours" else run_tp(name)
        res["ok"] = bool(res["train_ok"] and res["shape_ok"])
        if not res["train_ok"]:
            res["error"] = "train-mode forward fails after pruning"
        elif not res["shape_ok"]:
            res["error"] = "output shapes changed"
    except Exception as e:  # noqa: BLE001
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    finally:
        gc.enable()
    return res


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Worker:
    """A child process running ``one(name, tool)`` for one model after another (one torch import), killed
    and replaced when a model passes ``timeout`` seconds or adds ``max_rss_gb`` resident memory, or crashes;
    replaced before a model when earlier ones left it above half the guard."""

    def __init__(self, tool: str, timeout: float, max_rss_gb: float, script: str | None = None) -> None:
        self.tool, self.timeout, self.max_rss = tool, timeout, max_rss_gb * 2**30
        self.script = script or os.path.abspath(__file__)   # the bench whose --worker mode runs the models
        self.p: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.p is None or self.p.poll() is not None:
            self.err = tempfile.TemporaryFile("w+")
            self.p = subprocess.Popen([sys.executable, self.script, "--worker", "--tool", self.tool],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                      bufsize=1)
            assert self.p.stdout is not None
            self.p.stdout.readline()   # "ready": imports done, so they never count against a model's timeout
        return self.p

    def close(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.p = None

    def run(self, name: str) -> dict[str, Any]:
        import selectors
        p = self._start()
        if _rss_bytes(p.pid) > self.max_rss / 2:   # memory kept from earlier models: a fresh worker
            self.close()
            p = self._start()
        assert p.stdin is not None and p.stdout is not None
        base = _rss_bytes(p.pid)   # the guard counts what this model adds, not what earlier ones left
        p.stdin.write(name + "\n")
        p.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        t0, peak, why = time.monotonic(), 0, None
        try:
            while True:
                if sel.select(timeout=0.2):
                    line = p.stdout.readline()
                    if not line:
                        self.err.seek(0)
                        why = f"crashed (rc={p.wait()}): {self.err.read().strip().splitlines()[-1:]}"
                        break
                    if line.startswith("{"):
                        res = json.loads(line)
                        res["peak_rss_gb"] = round(peak / 2**30, 2)
                        return res
                    continue
                peak = max(peak, _rss_bytes(p.pid) - base)
                if peak > self.max_rss:
                    why = f"memory guard: resident > {self.max_rss / 2**30:.0f} GB"
                elif time.monotonic() - t0 > self.timeout:
                    why = f"timeout > {self.timeout:.0f}s"
                if why:
                    break
        finally:
            sel.close()
        self.close()
        return {"ok": False, "error": why}


def worker(tool: str) -> None:
    """``--worker``: read model names from stdin, print one JSON result line each."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import brainsurgeon.graph  # noqa: F401
    if tool == "tp":
        import torch_pruning  # noqa: F401
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name:
            print(json.dumps(one(name, tool)), flush=True)


def fmt_row(name: str, ours: dict[str, Any] | None, tp: dict[str, Any] | None) -> str:
    def side(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'-':>4} {'':>17} {'':>17} {'':>7}"
        if not r["ok"]:
            return f"{'ERR':>4} {r.get('error', '')[:44]:<44}"
        p, m = r["params"], r["macs"]
        return (f"{'ok':>4} {p[0] / 1e6:7.2f}->{p[1] / 1e6:7.2f}M {m[0] / 1e9:7.3f}->{m[1] / 1e9:7.3f}G "
                f"{r['seconds']:7.2f}")
    fwd = f"{ours['fwd_s']:6.2f}" if ours and "fwd_s" in ours else f"{'':>6}"
    return f"{name:<34} {fwd} {side(ours)} | {side(tp)}"


def summary(rows: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]) -> tuple[str, dict[str, Any]]:
    """One line per tool: ok count, median and worst seconds over its ok models; plus who does what."""
    stats: dict[str, Any] = {"models": len(rows)}
    parts = []
    for i, tool in ((1, "ours"), (2, "torch-pruning")):
        ran = [r for r in rows if r[i] is not None]
        if not ran:
            continue
        ok = [r for r in ran if r[i]["ok"]]
        secs = [r[i]["seconds"] for r in ok]
        stats[tool] = {"ok": len(ok), "ran": len(ran), "median_s": statistics.median(secs) if secs else None,
                       "worst_s": max(secs) if secs else None,
                       "worst_model": max(ok, key=lambda r: r[i]["seconds"])[0] if ok else None}
        line = f"{tool}: {len(ok)}/{len(ran)} ok"
        if secs:
            line += f", median {statistics.median(secs):.2f}s, worst {max(secs):.2f}s ({stats[tool]['worst_model']})"
        parts.append(line)
    both = [r for r in rows if r[1] is not None and r[2] is not None]
    if both:
        stats["only_ours"] = [r[0] for r in both if r[1]["ok"] and not r[2]["ok"]]
        stats["only_tp"] = [r[0] for r in both if r[2]["ok"] and not r[1]["ok"]]
        same = [r for r in both if r[1]["ok"] and r[2]["ok"]]
        if same:
            a = statistics.median([r[1]["seconds"] for r in same])
            b = statistics.median([r[2]["seconds"] for r in same])
            parts.append(f"on the {len(same)} both prune: median ours {a:.2f}s, torch-pruning {b:.2f}s")
            stats["both"] = {"n": len(same), "median_ours_s": a, "median_tp_s": b}
    return " | ".join(parts), stats


def write_tables(out_dir: str, rows: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]],
                 line: str) -> None:
    """results.csv and results.md (one row per model, both tools) under ``out_dir``."""
    import csv
    os.makedirs(out_dir, exist_ok=True)
    cols = ["ok", "error", "params_before", "params_after", "macs_before", "macs_after", "seconds"]

    def flat(r: dict[str, Any] | None) -> list[Any]:
        if r is None:
            return [""] * len(cols)
        p, m = r.get("params", ["", ""]), r.get("macs", ["", ""])
        sec = f"{r['seconds']:.3f}" if "seconds" in r else ""
        return [r["ok"], r.get("error", ""), p[0], p[1], m[0], m[1], sec]

    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "family", "fwd_s", "build_s", "prune_s", "groups", "failed_groups"]
                   + [f"ours_{c}" for c in cols] + [f"tp_{c}" for c in cols])
        for name, o, t in rows:
            w.writerow([name, family(name), *(f"{o[k]:.3f}" if o and k in o else "" for k in ("fwd_s", "build_s",
                                                                                             "prune_s")),
                        o.get("groups", "") if o else "", o.get("failed_groups", "") if o else ""] + flat(o) + flat(t))

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "- | | | "
        if not r["ok"]:
            return f"ERR: {r.get('error', '')[:70].replace('|', '/')} | | | "
        p, m = r["params"], r["macs"]
        return f"ok | {p[0] / 1e6:.2f} -> {p[1] / 1e6:.2f} | {m[0] / 1e9:.3f} -> {m[1] / 1e9:.3f} | {r['seconds']:.2f}"

    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# graph_coverage: {len(rows)} torchvision models, 50 % channels, L2\n\n{line}\n\n"
                "Seconds: process CPU time, 1 thread, build+prune; fwd: one eval forward.\n\n"
                "| model | fwd s | ours | params M | MACs G | s | torch-pruning | params M | MACs G | s |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        for name, o, t in rows:
            fwd = f"{o['fwd_s']:.2f}" if o and "fwd_s" in o else ""
            f.write(f"| {name} | {fwd} | {cell(o)} | {cell(t)} |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--full", action="store_true", help="every model of torchvision.models.list_models() (default)")
    ap.add_argument("--models", nargs="*", help="explicit model names")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--chunk", default=None, help="i/n: run the i-th of n interleaved chunks of the list")
    ap.add_argument("--out", default=None, help="folder for results.jsonl (appended), results.csv, results.md")
    ap.add_argument("--resume", action="store_true", help="skip (model, tool) pairs already in --out/results.jsonl")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model and tool")
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="memory guard per model and tool")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="ours", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.tool)))
        return 0
    if a.worker:
        worker(a.tool)
        return 0
    names = a.models or (QUICK if a.quick else all_models())
    if a.chunk:
        i, n = (int(v) for v in a.chunk.split("/"))
        names = names[i::n]
    done: dict[tuple[str, str], dict[str, Any]] = {}
    jsonl = os.path.join(a.out, "results.jsonl") if a.out else None
    if jsonl and a.resume and os.path.exists(jsonl):
        with open(jsonl, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                done[(r["model"], r["tool"])] = r["result"]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    tools = ["ours"] + ([] if a.no_tp else ["tp"])
    results: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in tools}
    workers = {tool: Worker(tool, a.timeout, a.max_rss_gb) for tool in tools}
    print(f"{len(names)} models; each model by ours, then by torch-pruning (same machine load for both)", flush=True)
    for name in names:
        for tool in tools:
            res = done.get((name, tool))
            if res is None:
                res = workers[tool].run(name)
                if jsonl:
                    with open(jsonl, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"model": name, "tool": tool, "result": res}) + "\n")
            results[tool][name] = res
        print(fmt_row(name, results["ours"][name], results["tp"][name] if "tp" in results else None), flush=True)
    for w in workers.values():
        w.close()
    rows = [(n, results["ours"].get(n), results["tp"].get(n) if "tp" in results else None) for n in names]
    print(f"\n{'model':<34} {'fwd':>6} {'ours':>4} {'params':>17} {'MACs':>17} {'sec':>7} | torch-pruning 1.6")
    for r in rows:
        print(fmt_row(*r))
    line, stats = summary(rows)
    print(line)
    bad = [r[0] for r in rows if not (r[1] or {}).get("ok")]
    slow = [r[0] for r in rows if (r[1] or {}).get("ok") and r[1]["seconds"] > 10.0]
    if bad:
        print("ours not ok: " + "; ".join(f"{r[0]}: {(r[1] or {}).get('error', '')[:120]}" for r in rows
                                          if r[0] in bad))
    if slow:
        print("ours over 10 s: " + ", ".join(f"{n} ({results['ours'][n]['seconds']:.1f}s, forward "
                                             f"{results['ours'][n].get('fwd_s', 0):.2f}s)" for n in slow))
    if a.out:
        write_tables(a.out, rows, line)
        with open(os.path.join(a.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
    if a.quick and (bad or slow):
        print(f"FAIL: not ok {bad}; over 10 s: {slow}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
