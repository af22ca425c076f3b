"""Parts ``deepcomp``, ``minilm`` and ``convs`` of bench/toolbox.py: Deep Compression, low-rank factorization.

    python bench/toolbox.py --only deepcomp,minilm,convs [--quick]   # or: python bench/lowrank_share.py [--quick]

deepcomp: MNIST CNN (``pretrained("mnist-cnn")``, cached): the paper's pipeline prune (SparseGPT here,
    magnitude in the paper) -> retrain (masks kept) -> k-means share -> centroid fine-tuning -> Huffman;
    plus uniform vs adaptive bits (Hessian trace / squared gradients). Every stage is a real file on disk:
    dense = safetensors of the state_dict; pruned = relative sparse index (fixed width) + fp32 values;
    shared = codebook + fixed-width indices; Huffman = the same streams Huffman coded. Each file is read
    back and decoded (bit-identical), and the Huffman stage's accuracy is measured on a model loaded from
    the file. Accuracy on the 10,000 MNIST test images (quick: the first 2,000; no bit-allocation table).
minilm: all-MiniLM-L6-v2's 12 FFN Linear layers factorized with plain SVD and activation-aware SVD at
    the same rank (= same parameter count); calibration on sentences from the start of
    pydoc_data.topics (block by block), evaluation on held-out sentences from its end (mean cosine to the
    dense embeddings) and SimLex-999 / WordSim-353 Spearman rho.
convs: (1) ResNet-20 trained on Fashion-MNIST (``pretrained("fashion-resnet20")``; no ImageNet ResNet
    weights ship offline): its 18 block 3x3 convs under Tucker-2 (HOSVD, HOOI) and channel SVD / ASVD at
    equal parameter budgets; test accuracy and top-1 agreement with dense, before and after a short KD
    fine-tune (teacher: dense; the factorized structure is trained as it is). (2) MobileNetV2 (ImageNet
    weights): its 3x3 convs are depthwise (groups=C) except the stem (3 -> 32); the stem under Tucker-2
    (R_in = 3 = all its inputs, so only R_out saves weights) vs channel SVD / ASVD, and its 8 large 1x1
    convs under plain vs activation-aware SVD; top-1 agreement and KL(dense || compressed) on random crops
    of real photos (scikit-image / matplotlib sample data; calibration crops from other photos).
quick: fewer retraining/fine-tuning steps, one budget per table, 16 calibration and 48 held-out
    sentences and no word similarity sets, 24 photo crops, 500 Fashion-MNIST test images and no fine-tuning
    in (1), whose ResNet-20 is trained for the quick run (1 epoch on 10k images, cached) instead of the zoo's
    4 epochs on 55k (~13 CPU min on a fresh clone).
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

import brainsurgeon as bs
from _vision import crops, damage, logits_of, mobilenet_v2, photos
from brainsurgeon.config import CalibOptions
from brainsurgeon.distill import KD, distill
from brainsurgeon.lowrank import LowRank, factorize_
from brainsurgeon.models import calibration_loader, evaluate, load_fashion_mnist_splits, pretrained
from brainsurgeon.share import WeightSharing, load_encoded, save_encoded, share_

# ----------------------------------------------------------------------------- deepcomp

SPARSITY = {"conv1": 0.4, "conv2": 0.7, "conv3": 0.8, "fc1": 0.95, "fc2": 0.7}
BITS = {"conv1": 6, "conv2": 5, "conv3": 5, "fc1": 4, "fc2": 5}
RETRAIN = {True: 150, False: 1500}  # masked retraining steps (quick, full)
FINETUNE = {True: 40, False: 400}  # centroid fine-tuning steps


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


def adaptive_rows(b, pruned: nn.Module, train_ds, test_ds, calib, tmp: str) -> None:
    """Uniform vs adaptive bits at the same average (no fine-tuning), on copies of the pruned model."""
    from brainsurgeon.share import adaptive_bits, gradient_sensitivity, hessian_sensitivity

    data = DataLoader(train_ds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(2))
    sens = {"Hessian trace": hessian_sensitivity(pruned, calib),
            "Hessian trace, relative": hessian_sensitivity(pruned, calib, relative=True),
            "squared gradient": gradient_sensitivity(pruned, data, max_batches=8)}
    rows = []
    for avg in (3, 2):
        plans = {"uniform": dict.fromkeys(SPARSITY, avg)}
        plans.update({k: adaptive_bits(pruned, v, avg_bits=avg, choices=range(1, 9)) for k, v in sens.items()})
        for label, bits in plans.items():
            m = copy.deepcopy(pruned)
            share_(m, WeightSharing(bits=8), overrides={k: WeightSharing(bits=bits_) for k, bits_ in bits.items()})
            f = save_encoded(m, os.path.join(tmp, "adaptive.bsdc"))
            nnz = {k: int((m.get_submodule(k).weight != 0).sum()) for k in bits}
            mean = sum(nnz[k] * v for k, v in bits.items()) / sum(nnz.values())
            rows.append([f"{label} (avg {avg})", " ".join(f"{v}" for v in bits.values()), f"{mean:.2f}",
                         f.bytes_on_disk, f"{evaluate(m, test_ds):.2%}"])
    print("  bit allocation on the pruned model, k-means without fine-tuning (bits: conv1 conv2 conv3 fc1 fc2):")
    b.table(["  allocation", "bits", "avg", "bytes", "test acc"], rows, [33, 10, 5, 7, 8])
    b.out["deepcomp_bits"] = rows


def deep_compression(b) -> None:
    print("MNIST CNN, Deep Compression: prune -> retrain -> share -> fine-tune -> Huffman (bytes of real files)")
    from safetensors.torch import save_file

    t0 = time.process_time()
    model, train_ds, test_ds = pretrained("mnist-cnn")
    if b.quick:
        test_ds = Subset(test_ds, range(2000))
    acc0 = evaluate(model, test_ds)
    tmp = tempfile.mkdtemp(prefix="bs-deepcomp-")
    dense_path = os.path.join(tmp, "dense.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dense_path)
    dense = os.path.getsize(dense_path)
    rows = [["dense fp32 (safetensors)", dense, "1.0x", f"{acc0:.2%}", ""]]

    calib = calibration_loader(train_ds, n=256 if b.quick else 512, batch_size=128)
    over = {k: bs.SparseGPT(sparsity=v) for k, v in SPARSITY.items()}  # OBS pruning instead of magnitude
    bs.sparsify_(model, bs.SparseGPT(sparsity=0.5), calib=calib, overrides=over)
    acc_p0 = evaluate(model, test_ds)
    retrain_masked(model, train_ds, steps=RETRAIN[b.quick], lr=1e-3)
    f = save_encoded(model, os.path.join(tmp, "pruned.bsdc"), values="raw", coding="fixed")
    acc_p = evaluate(model, test_ds)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    nnz, tot = sum(int((m.weight != 0).sum()) for m in layers), sum(m.weight.numel() for m in layers)
    rows.append([f"pruned {1 - nnz / tot:.1%} (acc before retrain {acc_p0:.2%})", f.bytes_on_disk,
                 f"{dense / f.bytes_on_disk:.1f}x", f"{acc_p:.2%}", "relative index + fp32"])

    if not b.quick:
        adaptive_rows(b, model, train_ds, test_ds, calib, tmp)
    over_s = {k: WeightSharing(bits=v, finetune_steps=FINETUNE[b.quick], lr=1e-4) for k, v in BITS.items()}
    rep = share_(model, WeightSharing(bits=5, finetune_steps=FINETUNE[b.quick], lr=1e-4), data=DataLoader(
        train_ds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(1)), overrides=over_s)
    f = save_encoded(model, os.path.join(tmp, "shared.bsdc"), values="codebook", coding="fixed")
    acc_s = evaluate(model, test_ds)
    rows.append([f"+ shared ({', '.join(f'{k} {v}b' for k, v in BITS.items())})", f.bytes_on_disk,
                 f"{dense / f.bytes_on_disk:.1f}x", f"{acc_s:.2%}", "codebook + fixed-width indices"])

    hpath = os.path.join(tmp, "huffman.bsdc")
    f = save_encoded(model, hpath, values="codebook", coding="huffman")
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(load_encoded(hpath))
    acc_h = evaluate(reloaded, test_ds)
    ratio = dense / os.path.getsize(hpath)
    rows.append(["+ Huffman (model loaded from file)", os.path.getsize(hpath), f"{ratio:.1f}x", f"{acc_h:.2%}",
                 "codebook + Huffman indices/gaps"])
    b.table(["stage", "bytes on disk", "smaller", "test acc", "stored as"], rows, [52, 13, 8, 8, 32])
    per = {r.name: (r.nonzeros, r.params, int(r.bits)) for r in rep.rows}
    print("  per layer (nonzeros/params, bits, Huffman bytes): " + ", ".join(
        f"{n} {a}/{p} {c}b {f.tensor_bytes[n + '.weight']}B" for n, (a, p, c) in per.items()))
    print(f"  ({time.process_time() - t0:.0f} CPU s; retrain {RETRAIN[b.quick]} steps of 128, "
          f"centroid fine-tuning {FINETUNE[b.quick]} steps)")
    b.out["deepcomp"] = {"rows": rows, "ratio": ratio, "acc_dense": acc0, "acc_final": acc_h}
    b.check(ratio >= 20 and acc0 - acc_h <= 0.01,
            f"Huffman file {ratio:.1f}x >= 20x smaller, accuracy drop {100 * (acc0 - acc_h):.2f} pt <= 1 pt")


# ----------------------------------------------------------------------------- minilm


def minilm_svd(b) -> None:
    print("all-MiniLM-L6-v2 FFN layers: activation-aware SVD vs plain SVD at equal parameter count")
    from _text import embed, load_minilm, pair_words, sentence_batches, similarity_rho, topic_sentences, word_pairs

    t0 = time.process_time()
    tok, bert = load_minilm()
    calib_s, eval_s = topic_sentences(16 if b.quick else 256, 48 if b.quick else 512)
    calib = sentence_batches(tok, calib_s, batch=16, max_length=128)
    simlex, ws = ([], []) if b.quick else (word_pairs("simlex999.txt"), word_pairs("wordsim353.tsv"))
    words = pair_words(simlex, ws)

    def score(model: nn.Module) -> tuple[str, str, torch.Tensor]:
        e = embed(model, tok, eval_s)
        w = dict(zip(words, embed(model, tok, words), strict=True)) if words else {}
        return tuple(f"{similarity_rho(w, p):.3f}" if p else "-" for p in (simlex, ws)) + (e,)  # type: ignore[return-value]

    sl0, ws0, e0 = score(bert)
    rows = [["dense", "589824", "-", "1.0000", sl0, ws0, ""]]
    ignore = (r".*attention.*", r"pooler\..*")  # FFN only: intermediate.dense, output.dense
    res = {}
    for ratio in ((0.5,) if b.quick else (0.5, 0.3, 0.15)):
        for aware in (False, True):
            m = copy.deepcopy(bert)
            t1 = time.process_time()
            rep = factorize_(m, LowRank(param_ratio=ratio, activation_aware=aware), calib=calib if aware else None,
                             ignore=ignore, options=CalibOptions(blocks="encoder.layer"))
            secs = time.process_time() - t1
            sl, wsr, e = score(m)
            cos = float((e * e0).sum(1).mean())
            res[(ratio, aware)] = cos
            rows.append([f"{'ASVD' if aware else 'SVD '} {ratio:.0%} params", str(rep.rows[0].params),
                         rep.rows[0].method.split()[1], f"{cos:.4f}", sl, wsr, f"{secs:.1f}"])
    b.table(["method (FFN weights kept)", "params/FFN1", "rank", "cos dense", "SimLex", "WS-353", "CPU s"], rows,
            [26, 11, 9, 9, 7, 7, 6])
    print(f"  ({len(eval_s)} held-out sentences, {len(words)} words of the similarity sets; "
          f"{time.process_time() - t0:.0f} CPU s)")
    b.out["minilm"] = {"rows": rows}
    for ratio in sorted({r for r, _ in res}, reverse=True):
        b.check(res[(ratio, True)] > res[(ratio, False)],
                f"ASVD cosine {res[(ratio, True)]:.4f} > SVD cosine {res[(ratio, False)]:.4f} at {ratio:.0%} params")


# ----------------------------------------------------------------------------- convs

TUCKER_FT_STEPS = 40  # KD fine-tuning steps of 128 images after factorization (full run only)


def _scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z0: torch.Tensor) -> tuple[float, float]:
    """(test accuracy, top-1 agreement with the dense logits z0) from one pass over x."""
    top = logits_of(model.eval(), x, bs=500).argmax(-1)
    return float((top == y).float().mean()), float((top == z0.argmax(-1)).float().mean())


def quick_resnet20(train) -> nn.Module:
    """ResNet-20 sized for --quick: 1 epoch on the first 10k training images (~40 CPU s; cached by this bench).

    The zoo's fashion-resnet20 is 4 epochs on 55k (~13 CPU min on 1 thread), which --quick must not train on a
    fresh clone (issue 13); quick's bound (HOOI kernel error <= HOSVD's) is a property of the factorization.
    """
    from brainsurgeon.models import build_model, default_cache_dir
    from brainsurgeon.models import train as train_model
    from brainsurgeon.models.zoo import save_atomic

    path = default_cache_dir() / "bench-fashion-resnet20-quick10k-seed0.pt"
    m = build_model("fashion-resnet20", seed=0)
    if path.is_file():
        m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return m.eval()
    train_model(m, Subset(train, range(10_000)), epochs=1, lr=3e-3, batch_size=128, seed=0)
    save_atomic(m.state_dict(), path)
    return m.eval()


def resnet_tucker(b) -> None:
    """Tucker-2 (HOSVD, HOOI) vs channel SVD / ASVD on ResNet-20's 18 block 3x3 convs, before/after KD."""
    print("ResNet-20 on Fashion-MNIST (no ImageNet ResNet weights ship offline): its 18 block 3x3 convs "
          "(16-64 channels) factorized at equal weight budgets")
    train, val, test = load_fashion_mnist_splits()
    dense = quick_resnet20(train) if b.quick else pretrained("fashion-resnet20")[0]
    test = Subset(test, range(500 if b.quick else 5000))  # 31M MACs per image: 5k test images in the full run
    x_test, y_test = (torch.stack(t) for t in zip(*(test[i] for i in range(len(test))), strict=True))
    z0 = logits_of(dense, x_test, bs=500)
    calib = calibration_loader(train, n=256, batch_size=128)
    ignore = (r"conv1", r".*shortcut.*", r"fc")  # the stem has 1 input channel; 1x1 shortcuts; classifier
    acc0 = _scores(dense, x_test, y_test, z0)[0]
    ft = 0 if b.quick else TUCKER_FT_STEPS
    rows, errs = [["dense", "", "", f"{acc0:.2%}", "100%", "", ""]], {}
    variants = [("Tucker-2 HOSVD", {"conv": "tucker2", "tucker_sweeps": 0}),
                ("Tucker-2 HOOI x5", {"conv": "tucker2", "tucker_sweeps": 5})]
    if not b.quick:
        variants += [("channel SVD", {"conv": "svd"}), ("channel ASVD", {"conv": "svd", "activation_aware": True})]
    for ratio in (0.6,) if b.quick else (0.6, 0.4):
        for label, kw in variants:
            m = copy.deepcopy(dense)
            rep = factorize_(m, LowRank(param_ratio=ratio, **kw), calib=calib if kw.get("activation_aware") else None,
                             ignore=ignore)
            acc, agr = _scores(m, x_test, y_test, z0)
            errs[(ratio, label)] = sum(r.loss for r in rep.rows) / sum(r.loss / max(r.rel_loss, 1e-300)
                                                                         for r in rep.rows)
            after = ["", ""]
            if ft:
                distill(m, dense, train, KD(epochs=1, max_steps=ft, lr=1e-3, seed=0), val=Subset(val, range(1000)))
                after = [f"{v:.2%}" for v in _scores(m, x_test, y_test, z0)]
            before = sum(torch.Size(r.shape).numel() for r in rep.rows)
            rows.append([f"{label} {ratio:.0%}", f"{sum(r.params for r in rep.rows)}/{before}",
                         f"{errs[(ratio, label)]:.3f}", f"{acc:.2%}", f"{agr:.1%}", *after])
    head, widths = ["method, budget", "weights", "rel.err", "test acc", "agree"], [24, 13, 7, 8, 6]
    b.table(head + [f"acc +{ft} KD", "agree"] if ft else head, [r if ft else r[:5] for r in rows],
            widths + [11, 6] if ft else widths)
    print(f"  ({len(test)} test images; rel.err: Tucker-2/SVD ||dK||^2/||K||^2 summed over layers, ASVD its "
          f"calibration-weighted error" + (f"; fine-tune: KD from dense, {ft} steps of 128, best of 1k val)" if ft
                                           else "; no fine-tuning in --quick)"))
    b.out["resnet_tucker"] = rows
    for ratio in sorted({r for r, _ in errs}, reverse=True):
        a, h = errs[(ratio, "Tucker-2 HOOI x5")], errs[(ratio, "Tucker-2 HOSVD")]
        b.check(a <= h + 1e-12, f"ResNet-20 HOOI kernel error {a:.4f} <= HOSVD {h:.4f} at {ratio:.0%}")


def mobilenet_convs(b) -> None:
    """MobileNetV2's stem (Tucker-2 vs channel SVD/ASVD) and its large 1x1 convs (SVD vs ASVD)."""
    net, imgs = mobilenet_v2(), photos()
    calib_x = crops(imgs[0::2], 16 if b.quick else 64, seed=1)  # calibration and evaluation photos differ
    eval_x = crops(imgs[1::2], 24 if b.quick else 128, seed=2)
    calib = [calib_x[i:i + 8] for i in range(0, len(calib_x), 8)]
    z0 = logits_of(net, eval_x)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    print(f"MobileNetV2 (ImageNet weights), {len(eval_x)} eval crops of {len(imgs[1::2])} photos, {len(calib_x)} "
          f"calibration crops of {len(imgs[0::2])} others.\n  Its 3x3 convs are depthwise (groups=C) but the stem "
          f"features.0.0 (32x3x3x3, 864 weights): Tucker-2 (R_out, R_in=3) vs channel SVD at ~equal weights")
    only_stem = tuple(re.escape(n) for n in convs if n != "features.0.0") + (r"classifier\..*",)
    rows = []
    for r in (8,) if b.quick else (12, 8, 4):
        variants = [(f"Tucker-2 ({r},3)", LowRank(rank=r)), (f"channel SVD r{r}", LowRank(rank=r, conv="svd")),
                    (f"channel ASVD r{r}", LowRank(rank=r, conv="svd", activation_aware=True))]
        for label, cfg in variants[::2] if b.quick else variants:  # quick: channel SVD = Tucker-2 here
            m = copy.deepcopy(net)
            rep = factorize_(m, cfg, calib=calib if cfg.activation_aware else None, ignore=only_stem,
                             options=CalibOptions(mode="dense"))
            agree, kl = damage(z0, logits_of(m, eval_x))
            row = rep.rows[0]
            rows.append([label, f"{row.params}/864", f"{row.rel_loss:.3f}", f"{agree:.1%}", f"{kl:.3f}"])
    b.table(["stem", "weights", "rel.err", "top-1 agr", "KL"], rows, [20, 9, 7, 9, 7])
    b.out["mobilenet_stem"] = rows

    print("  its 8 large 1x1 convs (>= 160 channels in and out, 1.58M of the 2.2M conv weights), plain vs "
          "activation-aware SVD")
    small = [re.escape(n) for n, c in convs.items() if c.groups > 1 or min(c.in_channels, c.out_channels) < 160]
    rows, res = [], {}
    for ratio in ((0.9,) if b.quick else (0.95, 0.9, 0.7)):
        for aware in (False, True):
            m = copy.deepcopy(net)
            rep = factorize_(m, LowRank(param_ratio=ratio, activation_aware=aware), calib=calib if aware else None,
                             ignore=(r"classifier\..*", *small), options=CalibOptions(mode="dense"))
            agree, kl = damage(z0, logits_of(m, eval_x))
            before = sum(torch.Size(r.shape).numel() for r in rep.rows)
            res[(ratio, aware)] = agree
            rows.append([f"{'ASVD' if aware else 'SVD '} budget {ratio:.0%}",
                         f"{sum(r.params for r in rep.rows)}/{before}", f"{agree:.1%}", f"{kl:.3f}"])
    b.table(["1x1 convs", "weights", "top-1 agr", "KL"], rows, [20, 16, 9, 7])
    b.out["mobilenet_1x1"] = rows
    for ratio in sorted({r for r, _ in res}, reverse=True):
        b.check(res[(ratio, True)] >= res[(ratio, False)],
                f"MobileNetV2 ASVD agreement {res[(ratio, True)]:.1%} >= SVD {res[(ratio, False)]:.1%} at {ratio:.0%}")


def conv_factorization(b) -> None:
    resnet_tucker(b)
    print()
    mobilenet_convs(b)


if __name__ == "__main__":
    from _runner import run

    sys.exit(run({"deepcomp": deep_compression, "minilm": minilm_svd, "convs": conv_factorization}, doc=__doc__,
                 prog="bench/lowrank_share.py"))
