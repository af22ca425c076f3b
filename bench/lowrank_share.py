"""Deep Compression on the MNIST CNN; activation-aware vs plain SVD on MiniLM; Tucker-2 / SVD on convs.

    python bench/lowrank_share.py                 # full tables (several minutes on 2 cores)
    python bench/lowrank_share.py --quick         # reduced run (see below); exit 1 if a bound fails
    python bench/lowrank_share.py --only a,c --json out.json

(a) MNIST CNN (``brainsurgeon.models.pretrained("mnist-cnn")``, trained once and cached): the paper's
    pipeline prune (SparseGPT here, magnitude in the paper) -> retrain (masks kept) -> k-means share ->
    centroid fine-tuning -> Huffman; plus uniform vs adaptive bits (Hessian trace / squared gradients). Every
    stage is a real file on disk: dense = safetensors of the state_dict; pruned = relative sparse index
    (fixed width) + fp32 values; shared = codebook + fixed-width indices; Huffman = the same streams
    Huffman coded. Each file is read back and decoded (bit-identical), and the Huffman stage's accuracy
    is measured on a model loaded from the file. Accuracy on the 10,000 MNIST test images.
(b) all-MiniLM-L6-v2: the 12 FFN Linear layers (intermediate.dense, output.dense) factorized with
    plain SVD and activation-aware SVD at the same rank (= same parameter count); calibration on
    sentences from the start of pydoc_data.topics (block by block), evaluation on held-out sentences
    from its end (mean cosine to the dense embeddings) and SimLex-999 / WordSim-353 Spearman rho.
(c) MobileNetV2 (ImageNet weights): its 3x3 convs are depthwise (groups=C), which Tucker-2 cannot
    reduce, and its one full 3x3 conv (the stem) has 3 input channels; so its large 1x1 convs are
    factorized (SVD), plain vs activation-aware; top-1 agreement and KL(dense || compressed) on random
    crops of real photos (scikit-image / matplotlib sample data; calibration crops from other photos).
    Tucker-2 on the 3x3 convs (conv2, conv3) of the MNIST CNN: HOSVD vs HOOI vs channel SVD / ASVD at
    equal parameter count, test accuracy.

--quick: fewer retraining/fine-tuning steps, one budget per table, 64 held-out sentences and WordSim-353
only, 32 photo crops, no channel-SVD rows in (c2); about 1 min of CPU (1 thread) once mnist-cnn is cached.

Bounds checked (exit 1 if one fails): (a) Huffman file >= 20x smaller than the dense file with <= 1 pt
accuracy drop; (b) ASVD mean cosine > plain SVD mean cosine at every ratio; (c) ASVD agreement >= plain
SVD agreement on MobileNetV2, and HOOI reconstruction error <= HOSVD's.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import brainsurgeon as bs  # noqa: E402
from _vision import crops, logits_of, mobilenet_v2, photos  # noqa: E402
from brainsurgeon.config import CalibOptions  # noqa: E402
from brainsurgeon.lowrank import LowRank, factorize_  # noqa: E402
from brainsurgeon.models import calibration_loader, evaluate, pretrained  # noqa: E402
from brainsurgeon.share import WeightSharing, load_encoded, save_encoded, share_  # noqa: E402

FAILS: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  bound: {what}: {'ok' if ok else 'FAILED'}")
    if not ok:
        FAILS.append(what)


def table(head: list[str], rows: list[list], widths: list[int]) -> None:
    for r in [head, *rows]:
        cells = [f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(r, widths, strict=True))]
        print("  " + " ".join(cells))


# ----------------------------------------------------------------------------- (a) Deep Compression


SPARSITY = {"conv1": 0.4, "conv2": 0.7, "conv3": 0.8, "fc1": 0.95, "fc2": 0.7}
BITS = {"conv1": 6, "conv2": 5, "conv3": 5, "fc1": 4, "fc2": 5}
RETRAIN = {True: 200, False: 1500}  # masked retraining steps (quick, full)
FINETUNE = {True: 60, False: 400}  # centroid fine-tuning steps


def retrain_masked(model: nn.Module, data, steps: int, lr: float, seed: int = 0) -> None:
    """Adam on every parameter; pruned weights are re-zeroed after each step (masks kept)."""
    masks = {m: m.weight != 0 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _, (x, y) in zip(range(steps), batches, strict=False):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for m, mask in masks.items():
                m.weight.mul_(mask)
    model.eval()


def adaptive_rows(pruned: nn.Module, train_ds, test_ds, calib, tmp: str, out: dict, quick: bool) -> None:
    """Uniform vs adaptive bits at the same average (no fine-tuning), on copies of the pruned model."""
    from brainsurgeon.share import adaptive_bits, gradient_sensitivity, hessian_sensitivity

    data = DataLoader(train_ds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(2))
    sens = {"Hessian trace": hessian_sensitivity(pruned, calib),
            "Hessian trace, relative": hessian_sensitivity(pruned, calib, relative=True),
            "squared gradient": gradient_sensitivity(pruned, data, max_batches=8)}
    rows = []
    for avg in (3,) if quick else (3, 2):
        plans = {"uniform": dict.fromkeys(SPARSITY, avg)}
        plans.update({k: adaptive_bits(pruned, v, avg_bits=avg, choices=range(1, 9)) for k, v in sens.items()})
        for label, bits in plans.items():
            m = copy.deepcopy(pruned)
            share_(m, WeightSharing(bits=8), overrides={k: WeightSharing(bits=b) for k, b in bits.items()})
            f = save_encoded(m, os.path.join(tmp, "adaptive.bsdc"))
            nnz = {k: int((m.get_submodule(k).weight != 0).sum()) for k in bits}
            mean = sum(nnz[k] * b for k, b in bits.items()) / sum(nnz.values())
            rows.append([f"{label} (avg {avg})", " ".join(f"{b}" for b in bits.values()), f"{mean:.2f}",
                         f.bytes_on_disk, f"{evaluate(m, test_ds):.2%}"])
    print("  bit allocation on the pruned model, k-means without fine-tuning (bits: conv1 conv2 conv3 fc1 fc2):")
    table(["  allocation", "bits", "avg", "bytes", "test acc"], rows, [33, 10, 5, 7, 8])
    out["a_bits"] = rows


def part_a(quick: bool, out: dict) -> None:
    print("\n(a) Deep Compression on the MNIST CNN: prune -> retrain -> share -> fine-tune -> Huffman")
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    model, train_ds, test_ds = pretrained("mnist-cnn")
    acc0 = evaluate(model, test_ds)
    tmp = tempfile.mkdtemp(prefix="bs-deepcomp-")
    dense_path = os.path.join(tmp, "dense.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dense_path)
    dense = os.path.getsize(dense_path)
    rows = [["dense fp32 (safetensors)", dense, "1.0x", f"{acc0:.2%}", ""]]

    calib = calibration_loader(train_ds, n=512, batch_size=128)
    over = {k: bs.SparseGPT(sparsity=v) for k, v in SPARSITY.items()}  # OBS pruning instead of magnitude
    bs.sparsify_(model, bs.SparseGPT(sparsity=0.5), calib=calib, overrides=over)
    acc_p0 = evaluate(model, test_ds)
    retrain_masked(model, train_ds, steps=RETRAIN[quick], lr=1e-3)
    f = save_encoded(model, os.path.join(tmp, "pruned.bsdc"), values="raw", coding="fixed")
    acc_p = evaluate(model, test_ds)
    nnz = sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    tot = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    rows.append([f"pruned {1 - nnz / tot:.1%} (acc before retrain {acc_p0:.2%})", f.bytes_on_disk,
                 f"{dense / f.bytes_on_disk:.1f}x", f"{acc_p:.2%}", "relative index + fp32"])

    adaptive_rows(model, train_ds, test_ds, calib, tmp, out, quick)
    over_s = {k: WeightSharing(bits=b, finetune_steps=FINETUNE[quick], lr=1e-4) for k, b in BITS.items()}
    rep = share_(model, WeightSharing(bits=5, finetune_steps=FINETUNE[quick], lr=1e-4), data=DataLoader(
        train_ds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(1)), overrides=over_s)
    f = save_encoded(model, os.path.join(tmp, "shared.bsdc"), values="codebook", coding="fixed")
    acc_s = evaluate(model, test_ds)
    rows.append([f"+ shared ({', '.join(f'{k} {b}b' for k, b in BITS.items())})", f.bytes_on_disk,
                 f"{dense / f.bytes_on_disk:.1f}x", f"{acc_s:.2%}", "codebook + fixed-width indices"])

    hpath = os.path.join(tmp, "huffman.bsdc")
    f = save_encoded(model, hpath, values="codebook", coding="huffman")
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(load_encoded(hpath))
    acc_h = evaluate(reloaded, test_ds)
    ratio = dense / os.path.getsize(hpath)
    rows.append(["+ Huffman (model loaded from file)", os.path.getsize(hpath), f"{ratio:.1f}x", f"{acc_h:.2%}",
                 "codebook + Huffman indices/gaps"])
    table(["stage", "bytes on disk", "smaller", "test acc", "stored as"], rows, [52, 13, 8, 8, 32])
    per = {r.name: (r.nonzeros, r.params, int(r.bits)) for r in rep.rows}
    print("  per layer (nonzeros/params, bits, Huffman bytes): " + ", ".join(
        f"{n} {a}/{b} {c}b {f.tensor_bytes[n + '.weight']}B" for n, (a, b, c) in per.items()))
    print(f"  ({time.perf_counter() - t0:.0f} s; retrain {RETRAIN[quick]} steps of 128, "
          f"centroid fine-tuning {FINETUNE[quick]} steps)")
    out["a"] = {"rows": rows, "ratio": ratio, "acc_dense": acc0, "acc_final": acc_h}
    check(ratio >= 20 and acc0 - acc_h <= 0.01,
          f"Huffman file {ratio:.1f}x >= 20x smaller, accuracy drop {100 * (acc0 - acc_h):.2f} pt <= 1 pt")


# ----------------------------------------------------------------------------- (b) MiniLM


def part_b(quick: bool, out: dict) -> None:
    print("\n(b) all-MiniLM-L6-v2 FFN layers: activation-aware SVD vs plain SVD at equal parameter count")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _text import embed, load_minilm, pair_words, sentence_batches, similarity_rho, topic_sentences, word_pairs

    t0 = time.perf_counter()
    tok, bert = load_minilm()
    calib_s, eval_s = topic_sentences(32 if quick else 256, 64 if quick else 512)
    calib = sentence_batches(tok, calib_s, batch=16, max_length=128)
    simlex, ws = ([] if quick else word_pairs("simlex999.txt")), word_pairs("wordsim353.tsv")
    words = pair_words(simlex, ws)

    def score(model: nn.Module) -> tuple[str, float, torch.Tensor]:
        e = embed(model, tok, eval_s)
        w = dict(zip(words, embed(model, tok, words), strict=True))
        return f"{similarity_rho(w, simlex):.3f}" if simlex else "-", similarity_rho(w, ws), e

    sl0, ws0, e0 = score(bert)
    rows = [["dense", "589824", "-", "1.0000", sl0, f"{ws0:.3f}", ""]]
    ignore = (r".*attention.*", r"pooler\..*")  # FFN only: intermediate.dense, output.dense
    res = {}
    for ratio in ((0.5,) if quick else (0.5, 0.3, 0.15)):
        for aware in (False, True):
            m = copy.deepcopy(bert)
            t1 = time.perf_counter()
            rep = factorize_(m, LowRank(param_ratio=ratio, activation_aware=aware), calib=calib if aware else None,
                             ignore=ignore, options=CalibOptions(blocks="encoder.layer"))
            secs = time.perf_counter() - t1
            sl, wsr, e = score(m)
            cos = float((e * e0).sum(1).mean())
            ffn = rep.rows[0]
            res[(ratio, aware)] = cos
            rows.append([f"{'ASVD' if aware else 'SVD '} {ratio:.0%} params", str(ffn.params),
                         ffn.method.split()[1], f"{cos:.4f}", sl, f"{wsr:.3f}", f"{secs:.1f}"])
    table(["method (FFN weights kept)", "params/FFN1", "rank", "cos dense", "SimLex", "WS-353", "sec"], rows,
          [26, 11, 9, 9, 7, 7, 6])
    print(f"  ({len(eval_s)} held-out sentences, {len(words)} words; {time.perf_counter() - t0:.0f} s)")
    out["b"] = {"rows": rows}
    for ratio in sorted({r for r, _ in res}, reverse=True):
        check(res[(ratio, True)] > res[(ratio, False)],
              f"ASVD cosine {res[(ratio, True)]:.4f} > SVD cosine {res[(ratio, False)]:.4f} at {ratio:.0%} params")


# ----------------------------------------------------------------------------- (c) convs


def part_c(quick: bool, out: dict) -> None:
    print("\n(c1) MobileNetV2 (ImageNet weights): its 8 large 1x1 convs (>= 160 channels in and out, 1.58M of the 2.2M"
          "\n     conv weights) factorized, plain vs activation-aware SVD; agreement with dense on photo crops")
    t0 = time.perf_counter()
    net, imgs = mobilenet_v2(), photos()
    small = [re.escape(n) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)
             and (m.groups > 1 or min(m.in_channels, m.out_channels) < 160)]
    calib_x = crops(imgs[0::2], 16 if quick else 64, seed=1)  # calibration and evaluation photos differ
    eval_x = crops(imgs[1::2], 32 if quick else 128, seed=2)
    z0 = logits_of(net, eval_x)
    p0 = z0.log_softmax(-1)
    rows, res = [], {}
    for ratio in ((0.9,) if quick else (0.95, 0.9, 0.7)):
        for aware in (False, True):
            m = copy.deepcopy(net)
            rep = factorize_(m, LowRank(param_ratio=ratio, activation_aware=aware),
                             calib=[calib_x[i:i + 8] for i in range(0, len(calib_x), 8)] if aware else None,
                             ignore=(r"classifier\..*", *small), options=CalibOptions(mode="dense"))
            z = logits_of(m, eval_x)
            agree = float((z.argmax(-1) == z0.argmax(-1)).float().mean())
            kl = float(F.kl_div(z.log_softmax(-1), p0, log_target=True, reduction="batchmean"))
            before = sum(r.shape[0] * torch.Size(r.shape[1:]).numel() for r in rep.rows)
            res[(ratio, aware)] = agree
            rows.append([f"{'ASVD' if aware else 'SVD '} budget {ratio:.0%}",
                         f"{sum(r.params for r in rep.rows)}/{before}", f"{agree:.1%}", f"{kl:.3f}"])
    table(["method", "weights", "top-1 agr", "KL"], rows, [20, 16, 9, 7])
    print(f"  ({len(eval_x)} eval crops of {len(imgs[1::2])} photos, {len(calib_x)} calibration crops of "
          f"{len(imgs[0::2])} others; {time.perf_counter() - t0:.0f} s. Its 3x3 convs are depthwise (groups=C) "
          f"and stay dense;\n   the one full 3x3 conv, the stem, has 3 input channels, so Tucker-2 cannot save "
          f"weights there: see (c2))")
    for ratio in sorted({r for r, _ in res}, reverse=True):
        check(res[(ratio, True)] >= res[(ratio, False)],
              f"MobileNetV2 ASVD agreement {res[(ratio, True)]:.1%} >= SVD {res[(ratio, False)]:.1%} at {ratio:.0%}")

    print("\n(c2) Tucker-2 on the MNIST CNN's 3x3 convs (conv2 32x16x3x3, conv3 64x32x3x3), equal parameter budget")
    model, train_ds, test_ds = pretrained("mnist-cnn")
    acc0 = evaluate(model, test_ds)
    calib = calibration_loader(train_ds, n=256, batch_size=128)
    rows2, errs = [["dense", "23040", "-", f"{acc0:.2%}"]], {}
    ratios = (0.3,) if quick else (0.5, 0.3, 0.15)
    variants = [("Tucker-2 HOSVD", {"conv": "tucker2", "tucker_sweeps": 0}),
                ("Tucker-2 HOOI x5", {"conv": "tucker2", "tucker_sweeps": 5})]
    if not quick:
        variants += [("channel SVD", {"conv": "svd"}), ("channel ASVD", {"conv": "svd", "activation_aware": True})]
    for ratio in ratios:
        for label, kw in variants:
            m = copy.deepcopy(model)
            rep = factorize_(m, LowRank(param_ratio=ratio, **kw), calib=calib if kw.get("activation_aware") else None,
                             ignore=(r"conv1", r"fc\d"))
            acc = evaluate(m, test_ds)
            errs[(ratio, label)] = sum(r.loss for r in rep.rows) / sum(r.loss / max(r.rel_loss, 1e-300)
                                                                         for r in rep.rows)
            rows2.append([f"{label} {ratio:.0%}", str(sum(r.params for r in rep.rows)),
                          " ".join(r.method.split(" ")[1 if "Tucker" in label else 1] for r in rep.rows),
                          f"{acc:.2%}"])
    table(["method, budget", "weights", "ranks conv2 conv3", "test acc"], rows2, [24, 8, 34, 8])
    print("  (Tucker-2 / SVD rel. error is ||dK||^2/||K||^2; ASVD minimises the error on the calibration inputs)")
    for ratio in ratios:
        a, b = errs[(ratio, "Tucker-2 HOOI x5")], errs[(ratio, "Tucker-2 HOSVD")]
        check(a <= b + 1e-12, f"HOOI kernel error {a:.4f} <= HOSVD {b:.4f} at {ratio:.0%}")
    out["c"] = {"mobilenet": rows, "mnist_tucker": rows2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run; exits 1 if a stated bound fails")
    ap.add_argument("--only", default="a,b,c", help="comma-separated parts to run: a, b, c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH", help="also write the tables as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"bench/lowrank_share.py {'--quick ' if args.quick else ''}(torch {torch.__version__}, "
          f"{args.threads} threads; a shared, loaded machine: seconds are indicative only)")
    out: dict = {}
    t0 = time.perf_counter()
    parts = {"a": part_a, "b": part_b, "c": part_c}
    for p in args.only.split(","):
        parts[p.strip()](args.quick, out)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {len(FAILS)} bound(s) failed")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
