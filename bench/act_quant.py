"""Activation quantization: W8A8 / W4A4 on MobileNetV2, OBC's joint 2:4 + WxAx search, int8 kernel latency.

    python bench/act_quant.py --quick     # each bound once on its smallest honest case (see below)
    python bench/act_quant.py             # 128 / 64 / 256 crops, budgets 4x 8x 12x 16x, statistics correction,
                                          # MNIST CNN + Fashion-MNIST ResNet-20 joint study, references
    python bench/act_quant.py --smollm    # + SmolLM2-135M W8A8 / W4A8 perplexity (about 15 CPU minutes)

MobileNetV2 (torchvision ImageNet weights), damage against the dense model on random crops of real
photos (``bench/_vision.py``: top-1 agreement and KL on evaluation crops of photos never used for
calibration):

1. W8A8 static: 8-bit symmetric per-channel weights (GPTQ), 8-bit asymmetric per-tensor activations
   (min-max observer) at every conv/linear input. Bound: >= 97 % agreement.
2. W4A4: round-to-nearest weights + min-max activations vs GPTQ weights + MSE activations (the first
   conv and the classifier stay at W8A8 in both). Bound: GPTQ + MSE has the lower KL.
3. The joint search (OBC, Frantar & Alistarh 2022): per layer 8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a (OBC's space: no
   layer stays float; depthwise convs, which 2:4 cannot divide, choose between 8w8a and 4w4a)
   (SparseGPT 2:4, GPTQ asymmetric per-channel weights, static per-tensor MSE activations; Hessians of
   the quantized inputs; per-entry output distortion as the score), DP vs uniform at each budget in
   both accountings: ``bops`` = MACs x w_bits x a_bits (dense fp32 = 32 x 32) and ``bops_obc`` = MACs x
   max(w_bits, a_bits) (dense 32; OBC's code: 8w8a = 4x, 4w4a = 8x, 2:4 + 4w4a = 16x). Plans are stitched
   from the database, activation scales calibrated on the stitched model; then the statistics correction
   on the calibration data, each from the uncorrected model: "BN" re-estimates every BatchNorm's statistics
   (OBC's batchnorm tuning; a control row gives the dense model after the same re-estimation), "bias" is
   bias correction (Nagel et al. 2019: each layer's own mean output error against the dense layer on the
   same inputs). Solvers: uniform (the
   variant of least summed score that fits), DP (OBC's DP on the additive per-layer scores) and DP+sel
   (SPDY, Frantar & Alistarh ICML 2022: DP plans over coefficient-reweighted scores, seeded with the
   uniform plan, each stitched exactly as above and scored by its KL to dense on held-out scoring crops;
   the least-KL plan wins, so it is never above uniform on the scoring crops). Bound: DP+sel's agreement
   >= uniform's wherever both meet the budget.
3b. The same joint study with true test accuracy: MNIST CNN and Fashion-MNIST ResNet-20 (every
   conv/linear searched; DP+sel scores on 256 train images outside the calibration set). Bound: DP+sel's
   test accuracy >= uniform's.

Latency (1 thread, CPU time, interleaved rounds): (4a) MiniLM encoder and one SmolLM2-135M MLP with
static W8A8 Linears (``torch._int_mm``) vs fp32 in torch; (4b) MobileNetV2 exported with
``export_static_qdq`` (the QDQ graph onnxruntime fuses into QLinearConv / QLinearAdd / QGemm; the
calibrated input scales kept, layer-output scales calibrated min-max) vs the fp32 export, both in
onnxruntime, with the kernel counts of onnxruntime's optimized graph; the full run adds the older
torch-decomposed QDQ export and onnxruntime's own ``quantize_static`` (its own calibration, same crops)
as references. Bound: int8 faster than fp32 at batch 32 on MiniLM, the SmolLM2 MLP (full run) and
MobileNetV2.

5. SmolLM2-135M (``--smollm``): perplexity of W8A8 per-token dynamic / static per-tensor, each with and
   without SmoothQuant (alpha 0.5), and W4A8, on llm_peers.py's pydoc / jargon windows. Bound: W8A8
   per-token dynamic within 5 % of dense on pydoc.

--quick (about 70 CPU s from a fresh clone): section 1's W8A8 row on 32 / 64 crops; the W4A4 bound (2b) and
the joint-search bound (3b, budgets 8x and 12x) on the digits CNN (trains in seconds, true test accuracy);
MiniLM latency (input scales calibrated, min-max RTN weights packed by convert_static_int8_(rtn=True): the same
int8 kernels without the MSE grid search) and MobileNetV2 latency on section 1's W8A8 model (section 3 on
MobileNetV2, the MobileNetV2 W4A4 rows, the statistics corrections and the references run in the full form
only). Exit 1 if a bound fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch

import brainsurgeon as bs
from _vision import crops, damage, logits_of, mobilenet_v2, photos
from brainsurgeon.calib import correct_bias_, reestimate_batchnorm_
from brainsurgeon.errors import BudgetInfeasibleError
from brainsurgeon.export import export_static_qdq
from brainsurgeon.quant import compare_latency, format_speed_table
from brainsurgeon.quant.act import act_quant_layers
from brainsurgeon.quant.static import convert_static_int8_
from brainsurgeon.search import (
    SPDY,
    Budget,
    SearchSpace,
    StitchedModel,
    build_database,
    dp_plan,
    spdy_plan,
    stitch_,
    uniform_plan,
    uniform_seeds,
)

JOINT = ("8w8a", "4w4a", "2:4+8w8a", "2:4+4w4a")
EDGE = ("features.0.0", "classifier.1")  # first conv, classifier: W8A8 in the W4A4 rows


def say(*a: object) -> None:
    print(*a, flush=True)


CORRECTIONS = {"bn", "bias"}  # --corrections: which of the two to measure (each costs one more evaluation)
SKIPPED = (float("nan"),) * 2
SOLVERS: set[str] = set()  # --solvers: a split run's subset of uniform, DP, DP+sel (empty: all)


def correct_(m, net, layers, data, score) -> list:
    """The issue's two statistics corrections of a compressed model `m`, each from the uncorrected model: BN
    (every BatchNorm's running statistics re-estimated on `data` with the compressed weights and quantized
    inputs in place: OBC's "batchnorm tuning", apply_plan_'s default; on a copy) and bias (empirical bias
    correction, Nagel et al. 2019: each layer's own mean output error against the dense layer on the same
    inputs, removed from its bias; `m` in place). Returns [score after BN, score after bias]; a correction
    left out of CORRECTIONS scores SKIPPED (nan)."""
    got = [SKIPPED, SKIPPED]
    if "bn" in CORRECTIONS:
        bn = copy.deepcopy(m)
        reestimate_batchnorm_(bn, data)
        got[0] = score(bn)
    if "bias" in CORRECTIONS:
        correct_bias_(m, net, list(layers), data)
        got[1] = score(m)
    return got


def bn_control(net, data, x_eval, ref) -> str:
    """The dense model itself after BN re-estimation on `data`: how far the data's statistics are from the
    training set's (on a few photos' crops, far: that, not quantization, is then what BN re-estimation measures)."""
    d = copy.deepcopy(net)
    reestimate_batchnorm_(d, data)
    agree, kl = damage(ref, logits_of(d, x_eval))
    return f"dense model after BN re-estimation on the same crops: {100 * agree:.1f}% / KL {kl:.4f}"


def w4a4(weights: str, observer: str, edge: tuple[str, ...] = EDGE) -> bs.Recipe:
    wcfg = bs.GPTQ(bits=4, sym=False) if weights == "GPTQ" else bs.RTN(bits=4, sym=False, mse=False)
    w8 = bs.GPTQ(bits=8, sym=True) if weights == "GPTQ" else bs.RTN(bits=8, sym=True, mse=False)
    over = tuple((n.replace(".", r"\."), bs.ActQuant(bits=8)) for n in edge)
    wover = tuple((n.replace(".", r"\."), w8) for n in edge)
    return bs.Recipe((bs.Step(bs.ActQuant(bits=4, observer=observer), overrides=over), bs.Step(wcfg, overrides=wover)),
                     bs.CalibOptions(mode="dense"))


def ptq_rows(net, calib, x_eval, ref, quick, failures, w8a8_only: bool = False):
    """Sections 1-2; returns the W8A8 model (uncorrected) in --quick, where section 4b times it, else None."""
    rows, kept = [], None
    recipes = [("W8A8 GPTQ + minmax", bs.W8A8("GPTQ", options=bs.CalibOptions(mode="dense")))]
    if not w8a8_only:
        recipes += [("W4A4 RTN + minmax", w4a4("RTN", "minmax")), ("W4A4 GPTQ + mse", w4a4("GPTQ", "mse"))]
    for name, recipe in recipes:
        m = copy.deepcopy(net)
        t0 = time.process_time()
        bs.compress(m, recipe, calib)
        agree, kl = damage(ref, logits_of(m, x_eval))
        kept = kept or (m if quick else None)
        corr = [(float("nan"),) * 2] * 2
        if not quick:  # BN re-estimation or bias correction, on the calibration crops
            corr = correct_(m, net, act_quant_layers(m), calib, lambda m: damage(ref, logits_of(m, x_eval)))
        rows.append((name, agree, kl, corr, time.process_time() - t0))
    say("\n1-2. MobileNetV2 PTQ, damage vs dense (agreement / KL); BN: BatchNorm statistics re-estimated, bias: "
        "bias correction (Nagel et al. 2019) instead, each on the calibration crops"
        + ("" if quick else f"; {bn_control(net, calib, x_eval, ref)}"))
    say(f"{'method':<22}{'agree':>8}{'KL':>9}{'BN':>17}{'bias':>17}{'cpu s':>7}")
    for name, a, k, corr, sec in rows:
        cells = "".join(f"{f'{100 * a2:.1f}% / {k2:.4f}':>17}" for a2, k2 in corr)
        say(f"{name:<22}{100 * a:>7.1f}%{k:>9.4f}{cells}{sec:>7.0f}")
    if rows[0][1] < 0.97:
        failures.append(f"W8A8 agreement {rows[0][1]:.4f} < 0.97")
    if len(rows) == 3 and rows[2][2] > rows[1][2]:
        failures.append(f"W4A4 GPTQ+mse KL {rows[2][2]:.4f} > RTN+minmax KL {rows[1][2]:.4f}")
    return kept


def w8a8_ablation(net, calib, x_eval, ref) -> None:
    """What each standard fix does to the 8-bit per-tensor activations alone (float weights), and what
    8-bit per-channel RTN weights alone do: the damage floor the W8A8 bound has to clear."""
    rows = []
    m = copy.deepcopy(net)
    bs.quantize_(m, bs.RTN(bits=8, sym=True, mse=False))
    rows.append(("W8 RTN per-channel only", *damage(ref, logits_of(m, x_eval))))
    for label, cfg in [("A8 minmax", bs.ActQuant(bits=8)),
                       ("A8 percentile 99.99", bs.ActQuant(bits=8, observer="percentile")),
                       ("A8 mse", bs.ActQuant(bits=8, observer="mse")),
                       ("A8 minmax + CLE 0.5", bs.ActQuant(bits=8, equalize=0.5)),
                       ("A8 mse + CLE 0.5", bs.ActQuant(bits=8, observer="mse", equalize=0.5)),
                       ("A8 mse + CLE 1.0", bs.ActQuant(bits=8, observer="mse", equalize=1.0))]:
        m = copy.deepcopy(net)
        bs.quantize_(m, cfg, calib)
        rows.append((label, *damage(ref, logits_of(m, x_eval))))
    say(f"\n1a. W8A8 ablation on {len(x_eval)} evaluation crops ({len(act_quant_layers(m))} layer inputs; "
        f"CLE = cross-layer equalization through BN -> ReLU6 -> conv, bs.ActQuant(equalize=alpha))")
    say(f"{'variant':<26}{'agree':>8}{'KL':>9}")
    for label, a, k in rows:
        say(f"{label:<26}{100 * a:>7.1f}%{k:>9.4f}")


def joint_solvers(net, table, scoring, calib, evals: int):
    """uniform, the plain DP (additive per-layer scores) and DP+sel: SPDY's search over coefficient-weighted
    DP plans seeded with the uniform plan, every candidate stitched (input quantizers calibrated on `calib`,
    as stitch_ does) and scored by its KL to the dense model on the held-out `scoring` batches; the least-KL
    plan wins, so DP+sel is never above uniform on that data. The bound is on DP+sel."""
    stitched = StitchedModel(net, table, scoring, batches=len(scoring), metric="kl", act_calib=calib)

    def select(table, budget):  # seeded with the uniform plan where one fits
        return spdy_plan(table, budget, stitched.error, SPDY(evals=evals, patience=max(2, evals // 6)),
                         seeds=uniform_seeds(table, budget))

    return (("uniform", uniform_plan), ("DP", dp_plan), ("DP+sel", select))


def budget_sweep(net, table, calib, solvers, metrics, facts, score, corrected, what, failures, tag="") -> None:
    """Every solver's plan at every budget, stitched onto a copy of `net`, scored and printed as measured (a
    split run killed at its time limit keeps what it measured). `score(m)` -> (the bound's value, the row's
    cells); `corrected(m)` -> the statistics-corrected cells (it corrects m in place, or gives blank cells).
    Bounds: no plan over its budget, DP+sel's value >= uniform's. A plan already scored in this sweep (same
    variant per layer: the same stitched model, bit for bit) reuses that row's numbers, marked "(= its row)"."""
    seen: dict[tuple, tuple] = {}  # plan.variants -> (first row's budget and solver, bound value, cells)
    for metric in metrics:
        for f in facts:
            budget, got = Budget(metric, 1 / f), {}
            for solver, solve in solvers:
                if SOLVERS and solver not in SOLVERS:
                    continue
                try:
                    plan = solve(table, budget)
                except BudgetInfeasibleError as e:
                    say(f"{str(budget):<16}{f:>9}x{solver:>9}  infeasible: {str(e).split(';')[0][:60]}")
                    continue
                key, same = tuple(plan.variants), ""
                if key in seen:
                    row, got[solver], cells = seen[key]
                    same = f" (= {row})"
                else:
                    m = stitch_(copy.deepcopy(net), plan, table, calib)
                    got[solver], cells = score(m)
                    cells += corrected(m)
                    del m
                    seen[key] = (f"{budget} {solver}", got[solver], cells)
                counts = {v: plan.variants.count(v) for v in dict.fromkeys(plan.variants)}
                say(f"{str(budget):<16}{f:>9}x{solver:>9}{plan.info['cost']:>9.4f}{cells}"
                    f"  {' '.join(f'{v}x{c}' for v, c in counts.items())}{_picked(plan)}{same}")
                if plan.info["cost"] > budget.fraction + 1e-9:
                    failures.append(f"{tag}{budget}: {solver} cost {plan.info['cost']} over budget")
            if "DP+sel" in got and "uniform" in got and got["DP+sel"] < got["uniform"]:
                failures.append(f"{tag}{budget}: DP+sel {what} {got['DP+sel']:.4f} < uniform {got['uniform']:.4f}")


def _picked(plan) -> str:
    i = plan.info
    if "picked" not in i:
        return ""
    uni = i["seed_losses"].get("uniform")
    return f" [{i['picked']}; KL {i['score']:.4g}, DP {i['dp_loss']:.4g}, uniform " + \
        ("infeasible" if uni is None else f"{uni:.4g}") + "]"


def joint_rows(net, calib, scoring, x_eval, ref, quick, db, failures, metrics=("bops", "bops_obc"), facts=(),
               evals: int = 24) -> None:
    space = SearchSpace(prune_method="SparseGPT", quant_method="GPTQ", levels=0, nm=(), block_sparsities=(), bits=(),
                        nm_bits=(), joint=JOINT, act_observer="mse", quant_sym=False,
                        model_loss_batches=1 if quick else 2)
    t0 = time.process_time()
    table = build_database(net, space, calib, db)
    n = sum(len(v) for v in table.entries.values())
    table = table.only(JOINT)  # OBC's space: no float layer (the database's dense entries are not choices)
    say(f"\n3. joint database: {n} entries over {len(table.layers)} layers ({table.computed} computed now, "
        f"{time.process_time() - t0:.0f} cpu s)")
    facts = facts or ((8, 12) if quick else (4, 8, 12, 16))
    solvers = joint_solvers(net, table, scoring, calib, 8 if quick else evals)
    say("joint DP vs uniform (stitched; agreement / KL vs dense" + ("" if quick else "; BN: BatchNorm statistics "
        "re-estimated, bias: bias correction instead, each on the calibration crops; "
        + bn_control(net, calib, x_eval, ref)) + "; each row printed as measured)")
    say(f"{'budget':<16}{'reduction':>10}{'solver':>9}{'cost':>9}{'agree':>8}{'KL':>9}{'BN':>17}{'bias':>17}"
        f"  variants")
    def score(m):
        agree, kl = damage(ref, logits_of(m, x_eval))
        return agree, f"{100 * agree:>7.1f}%{kl:>9.4f}"

    def corrected(m):
        if quick:
            return f"{'':>34}"
        got = correct_(m, net, table.layers, calib, lambda m: damage(ref, logits_of(m, x_eval)))
        return "".join(f"{f'{100 * a2:.1f}% / {k2:.4f}':>17}" for a2, k2 in got)

    budget_sweep(net, table, calib, solvers, metrics, facts, score, corrected, "agreement", failures)
    say("OBC (paper, ResNet18/34/50 on ImageNet, joint 2:4 + WxAx at 12x BOPs in its own accounting): about 2.5 % "
        "relative accuracy drop; compare with the bops_obc=0.0833 rows (agreement with dense on photo crops here, "
        "not ImageNet accuracy, and MobileNetV2, not a ResNet).")


def classifier_w4a4(name: str, failures: list[str]) -> None:
    """Section 2's W4A4 comparison on a small classifier (the --quick form): RTN + min-max vs GPTQ + MSE, first
    conv and classifier at W8A8; KL vs dense and true accuracy on the test split. Bound: GPTQ + MSE has the lower KL."""
    from brainsurgeon.models import calibration_loader, evaluate, pretrained

    net, train, test = pretrained(name)
    calib = [x for x, _ in calibration_loader(train, n=256, batch_size=64)]
    x_test = test.tensors[0]
    ref = logits_of(net, x_test)
    layers = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    say(f"\n2b. W4A4 on {name} ({len(x_test)} test images; {layers[0]}, {layers[-1]} at W8A8), dense accuracy "
        f"{100 * evaluate(net, test):.2f}%")
    say(f"{'method':<22}{'agree':>8}{'KL':>9}{'test acc':>10}{'cpu s':>7}")
    kls = []
    for label, weights, observer in (("W4A4 RTN + minmax", "RTN", "minmax"), ("W4A4 GPTQ + mse", "GPTQ", "mse")):
        m = copy.deepcopy(net)
        t0 = time.process_time()
        bs.compress(m, w4a4(weights, observer, (layers[0], layers[-1])), calib)
        agree, kl = damage(ref, logits_of(m, x_test))
        kls.append(kl)
        acc, sec = evaluate(m, test), time.process_time() - t0
        say(f"{label:<22}{100 * agree:>7.1f}%{kl:>9.4f}{100 * acc:>9.2f}%{sec:>7.1f}")
    if kls[1] > kls[0]:
        failures.append(f"{name} W4A4 GPTQ+mse KL {kls[1]:.4f} > RTN+minmax KL {kls[0]:.4f}")


def classifier_joint(name: str, quick: bool, db: str, failures: list[str], metrics=("bops", "bops_obc"),
                     facts=(), evals: int = 24) -> None:
    """The joint search on a small classifier with true test accuracy (section 3's space and bound).

    Every conv/linear is searched (asymmetric per-channel GPTQ weights, MSE static activations); budgets in
    both accountings; accuracy on the model's own test split. Bound: DP's accuracy >= uniform's."""
    from brainsurgeon.models import calibration_loader, evaluate, load_fashion_mnist_splits, pretrained

    t0 = time.process_time()
    net, train, test = pretrained(name)
    if name == "fashion-resnet20":
        train, _, test = load_fashion_mnist_splits()
    n_cal = 128 if quick else 512
    xs = [x for x, _ in calibration_loader(train, n=n_cal + 256, batch_size=64)]
    calib, scoring = xs[: n_cal // 64], xs[n_cal // 64:]  # scoring: 256 other train images, for DP+sel
    space = SearchSpace(prune_method="SparseGPT", quant_method="GPTQ", levels=0, nm=(), block_sparsities=(), bits=(),
                        nm_bits=(), joint=JOINT, act_observer="mse", quant_sym=False,
                        model_loss_batches=1 if quick else 2)
    table = build_database(net, space, calib, db).only(JOINT)  # OBC's space: no float layer
    dense_acc, control = evaluate(net, test), ""
    if not quick:
        d = copy.deepcopy(net)
        reestimate_batchnorm_(d, calib)
        control = f" ({100 * evaluate(d, test):.2f}% after BN re-estimation on the calibration set)"
    say(f"\n3b. joint search on {name}: {len(table.layers)} layers, {len(test)} test images, {len(calib)} x 64 "
        f"calibration images (train split); dense test accuracy {100 * dense_acc:.2f}%{control}")
    say(f"{'budget':<16}{'reduction':>10}{'solver':>9}{'cost':>9}{'test acc':>10}{'BN acc':>10}{'bias acc':>10}"
        f"  variants   (BN: BatchNorm statistics re-estimated, bias: bias-corrected instead, on the calibration set)")
    solvers = joint_solvers(net, table, scoring, calib, 8 if quick else evals)
    def score(m):
        acc = evaluate(m, test)
        return acc, f"{100 * acc:>9.2f}%"

    def corrected(m):
        if quick:
            return f"{'':>20}"
        got = correct_(m, net, table.layers, calib, lambda m: (evaluate(m, test), 0.0))
        return "".join(f"{100 * a:>9.2f}%" for a, _ in got)

    budget_sweep(net, table, calib, solvers, metrics, facts or ((8, 12) if quick else (4, 8, 12, 16)), score,
                 corrected, "test accuracy", failures, tag=f"{name} ")
    say(f"({name}: {time.process_time() - t0:.0f} cpu s)")


def _ort_session(path: str, dump: str = ""):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    if dump:  # onnxruntime's optimized graph: which kernels actually run
        opts.optimized_model_filepath = dump
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _ops(path: str) -> str:
    import collections

    import onnx

    c = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    keep = ("QLinearConv", "QLinearAdd", "QGemm", "Conv", "DequantizeLinear", "QuantizeLinear", "BatchNormalization")
    return " ".join(f"{k}x{c[k]}" for k in keep if c[k])


def linear_latency(quick: bool, failures: list[str]) -> None:
    """W8A8 Linear through torch._int_mm vs fp32: MiniLM (whole encoder) and one SmolLM2-135M MLP.

    --quick skips the MSE weight-grid search (W8A8("RTN")) and the code recovery: convert_static_int8_(rtn=True)
    rounds the weights to the min-max per-row grid while packing; the timed int8 kernels are the same."""
    from _text import load_minilm, load_smollm, sentence_batches, topic_sentences

    tok, bert = load_minilm()
    cal_txt, held = topic_sentences(16 if quick else 64, 64)
    m = copy.deepcopy(bert)
    if quick:  # the same int8 kernels: static 8-bit input scales, min-max RTN weights rounded by the conversion
        bs.quantize_(m, bs.ActQuant(bits=8), sentence_batches(tok, cal_txt, 16))
        convert_static_int8_(m, rtn=True)
    else:
        bs.compress(m, bs.W8A8("RTN"), sentence_batches(tok, cal_txt, 16))
        convert_static_int8_(m)
    hb = sentence_batches(tok, held, 32)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(bert(**hb[0]).last_hidden_state,
                                                    m(**hb[0]).last_hidden_state, dim=-1).mean().item()
    rows = compare_latency({"MiniLM fp32": bert, "MiniLM W8A8 int8": m},
                           {1: {k: v[:1] for k, v in hb[0].items()}, 32: hb[0]}, clock="cpu",
                           min_run_time=0.5 if quick else 2.0)
    say(f"\n4a. Linear latency, 1 thread, CPU time; MiniLM encoder, seq {hb[0]['input_ids'].shape[1]}, token cosine "
        f"int8 vs fp32 {cos:.4f}")
    say(format_speed_table(rows).replace("MAC ratio", "   (n/a)"))
    r32 = next(r for r in rows if r.batch == 32 and "int8" in r.variant)
    if r32.speedup <= 1.0:
        failures.append(f"MiniLM W8A8 int8 not faster than fp32 at batch 32 ({r32.speedup:.2f}x)")
    if quick:
        return
    _, lm = load_smollm()
    mlp, seen = lm.model.layers[15].mlp, []
    h = mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    tok_ids = torch.arange(1000, 1000 + 4 * 256).reshape(4, 256) % lm.config.vocab_size
    with torch.inference_mode():
        lm(input_ids=tok_ids, use_cache=False)
    h.remove()
    X = seen[0].reshape(-1, seen[0].shape[-1])  # (1024 tokens, 576): real hidden states of layer 15
    q = copy.deepcopy(mlp)
    bs.compress(q, bs.W8A8("RTN"), [X[i:i + 256][None] for i in range(0, 1024, 256)])
    convert_static_int8_(q)
    x1, x32 = X[:128][None], X.repeat(4, 1).reshape(32, 128, -1)
    with torch.inference_mode():
        rel = float((q(x32) - mlp(x32)).norm() / mlp(x32).norm())
    rows = compare_latency({"SmolLM2 MLP fp32": mlp, "SmolLM2 MLP W8A8 int8": q}, {1: x1, 32: x32}, clock="cpu",
                           min_run_time=2.0)
    say(f"SmolLM2-135M layer-15 MLP (576 -> 1536 -> 576, SiLU gate), batch b x 128 tokens; relative output error "
        f"int8 vs fp32 {rel:.4f}")
    say(format_speed_table(rows).replace("MAC ratio", "   (n/a)"))
    r32 = next(r for r in rows if r.batch == 32 and "int8" in r.variant)
    if r32.speedup <= 1.0:
        failures.append(f"SmolLM2 MLP W8A8 int8 not faster than fp32 at batch 32 ({r32.speedup:.2f}x)")


def conv_latency(net, calib, x_eval, quick: bool, failures: list[str], q=None) -> None:
    """MobileNetV2 W8A8 in onnxruntime: our static QDQ export vs the fp32 export (+ references in the full run:
    the torch-decomposed QDQ of export_onnx(quantized="qdq") and onnxruntime's own quantize_static).

    --quick exports fp32 with the TorchScript exporter once per batch size (1.4 instead of ~35 CPU s for the
    dynamo exporter's graph optimizer; onnxruntime fuses either graph into the same Conv kernels, listed below)
    and times section 1's W8A8 model `q` (GPTQ weights: the same int8 kernels, one compression less)."""
    weights = "GPTQ (section 1's model)" if q is not None else "RTN"
    if q is None:
        q = copy.deepcopy(net)
        bs.compress(q, bs.W8A8("RTN"), calib)
    dyn = ({0: "batch"},)  # one export serves both batch sizes
    d = tempfile.mkdtemp(prefix="act-quant-ort-")
    files = {"fp32": {b: os.path.join(d, f"fp32-{b}.onnx") for b in (1, 32)} if quick else os.path.join(d, "fp32.onnx"),
             "int8 static QDQ (ours)": os.path.join(d, "int8.onnx")}
    t0 = time.process_time()
    if quick:
        for b, f in files["fp32"].items():
            bs.export_onnx(net, (x_eval[:b],), f, dynamo=False)
    else:
        bs.export_onnx(net, (x_eval[:2],), files["fp32"], dynamic_shapes=dyn)
    export_static_qdq(q, (x_eval[:2],), files["int8 static QDQ (ours)"], calib=calib, dynamic_shapes=dyn)
    if not quick:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter([{"x": b.numpy()} for b in calib])

            def get_next(self):  # noqa: ANN202 - onnxruntime's interface
                return next(self.it, None)

        files["int8 decomposed QDQ (before)"] = os.path.join(d, "qdq-old.onnx")
        bs.export_onnx(q, (x_eval[:2],), files["int8 decomposed QDQ (before)"], quantized="qdq",
                       atol=float("inf"), dynamic_shapes=dyn)
        files["int8 ORT quantize_static"] = os.path.join(d, "ort-static.onnx")
        quantize_static(files["fp32"], files["int8 ORT quantize_static"], Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    per_batch = {k: f if isinstance(f, dict) else {1: f, 32: f} for k, f in files.items()}
    sess = {(k, b): _ort_session(f, f + ".opt") for k, fs in per_batch.items() for b, f in fs.items()
            if b == 32 or f != fs[32]}
    sess.update({(k, 1): sess[(k, 32)] for k in files if (k, 1) not in sess})
    say(f"\n4b. MobileNetV2 in onnxruntime 1 thread, CPU ms (median of interleaved runs); W8A8 {weights} weights, "
        f"activation scales calibrated on {sum(len(c) for c in calib)} crops (exports {time.process_time() - t0:.0f} "
        f"cpu s); kernels onnxruntime runs after its graph optimization:")
    for k, fs in per_batch.items():
        say(f"  {k:<30} {_ops(fs[32] + '.opt')}")
    say(f"{'variant':<32}{'batch':>6}{'cpu ms':>9}{'vs fp32':>9}{'agree':>8}")
    ref = logits_of(net, x_eval)
    for b in (1, 32):
        x = x_eval[:b]
        times: dict[str, list[float]] = {k: [] for k in files}
        for _ in range((10 if b == 1 else 3) * (1 if quick else 3)):
            for k in files:
                s = sess[(k, b)]
                feed = {s.get_inputs()[0].name: x.numpy()}
                s.run(None, feed)
                t1 = time.process_time()
                s.run(None, feed)
                times[k].append(time.process_time() - t1)
        med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        for k in files:
            agree = float("nan")
            if b == 32:  # all evaluation crops, 32 at a time
                s = sess[(k, 32)]
                out = [s.run(None, {s.get_inputs()[0].name: x_eval[i:i + 32].numpy()})[0]
                       for i in range(0, len(x_eval) - len(x_eval) % 32, 32)]
                agree = damage(ref[: 32 * len(out)], torch.from_numpy(np.concatenate(out)))[0]
            say(f"{k:<32}{b:>6}{med[k]:>9.2f}{med['fp32'] / med[k]:>8.2f}x{100 * agree:>7.1f}%")
        if b == 32 and med["int8 static QDQ (ours)"] >= med["fp32"]:
            failures.append(f"MobileNetV2 ORT int8 not faster than fp32 at batch 32 "
                            f"({med['int8 static QDQ (ours)']:.1f} vs {med['fp32']:.1f} ms)")
    say(f"  (agreement: top-1 vs the dense torch model on the first {32 * (len(x_eval) // 32)} evaluation crops)")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def smollm_tokens(quick: bool):
    """llm_peers.py's data: calibration 8 x 256 tokens from the first half of pydoc_data.topics, evaluation
    windows of 512 tokens from its second half ("pydoc") and from Debian's jargon file ("jargon")."""
    import gzip
    import pathlib
    import pydoc_data.topics as t

    jargon = pathlib.Path("/usr/share/doc/jargon-text/jargon.txt.gz")
    if not jargon.exists():
        raise SystemExit(f"{jargon} is missing: apt-get install jargon-text")
    from _text import load_smollm

    tok, lm = load_smollm()
    ids = tok("\n\n".join(t.topics[k] for k in sorted(t.topics)), return_tensors="pt")["input_ids"][0]
    jar = tok(gzip.open(jargon, "rt", encoding="utf-8", errors="replace").read(), return_tensors="pt")["input_ids"][0]
    half, n_eval = len(ids) // 2, 2 if quick else 8
    cal = [{"input_ids": ids[i * 256:(i + 1) * 256][None]} for i in range(8)]
    evals = {"pydoc": [ids[half + i * 512: half + (i + 1) * 512][None] for i in range(n_eval)],
             "jargon": [jar[i * 512:(i + 1) * 512][None] for i in range(n_eval)]}
    return tok, lm, cal, evals


def smollm_rows(quick: bool, failures: list[str], only: str = "") -> None:
    """SmolLM2-135M perplexity: W8A8 (RTN 8-bit per-channel weights) with per-token dynamic or static
    per-tensor activations, each with and without SmoothQuant (alpha 0.5), and W4A8 (GPTQ 4-bit g128
    weights + static 8-bit activations) with and without SmoothQuant. lm_head stays float.
    Bound: W8A8 per-token dynamic within 5 % of dense perplexity on pydoc (fixed before the first run)."""
    from _text import perplexity

    tok, lm, cal, evals = smollm_tokens(quick)
    n_eval = len(evals["pydoc"])
    say(f"\n5. SmolLM2-135M perplexity; calibration 8 x 256 tokens (pydoc first half), evaluation {n_eval} x 512 "
        f"tokens (pydoc second half / jargon); lm_head float; 1 thread")
    say(f"{'method':<40}{'pydoc':>9}{'jargon':>9}{'compress cpu s':>16}")
    dense = {k: perplexity(lm, w) for k, w in evals.items()}
    say(f"{'dense fp32':<40}{dense['pydoc']:>9.2f}{dense['jargon']:>9.2f}")
    opts = bs.CalibOptions(mode="dense")

    def w4a8(smooth: float) -> bs.Recipe:
        return bs.Recipe((bs.Step(bs.ActQuant(bits=8, smooth=smooth)), bs.Step(bs.GPTQ(bits=4, group_size=128))),
                         opts)

    rows = [("W8A8 per-token dynamic", bs.W8A8("RTN", granularity="token", options=opts)),
            ("W8A8 per-token dynamic + SmoothQuant", bs.W8A8("RTN", granularity="token", options=opts, smooth=0.5)),
            ("W8A8 static per-tensor", bs.W8A8("RTN", options=opts)),
            ("W8A8 static per-tensor + SmoothQuant", bs.W8A8("RTN", options=opts, smooth=0.5)),
            ("W4A8 static (GPTQ 4-bit g128)", w4a8(0.0)),
            ("W4A8 static + SmoothQuant", w4a8(0.5))]
    if quick:
        rows = rows[:1]
    if only:  # a resumed run: these rows only (0-based, comma list)
        rows = [rows[int(i)] for i in only.split(",")]
    got = {}
    for name, recipe in rows:
        m = copy.deepcopy(lm)
        t0 = time.process_time()
        recipe = bs.Recipe(tuple(bs.Step(st.method, ignore=("lm_head",)) for st in recipe.steps), recipe.calib)
        bs.compress(m, recipe, cal)
        sec = time.process_time() - t0
        got[name] = {k: perplexity(m, w) for k, w in evals.items()}
        say(f"{name:<40}{got[name]['pydoc']:>9.2f}{got[name]['jargon']:>9.2f}{sec:>16.0f}")
        del m
    p = got.get("W8A8 per-token dynamic", {}).get("pydoc", 0.0)
    if p > 1.05 * dense["pydoc"]:
        failures.append(f"SmolLM2 W8A8 per-token dynamic pydoc perplexity {p:.2f} > 1.05 x dense {dense['pydoc']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", default="out/act-quant-db")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: ptq,joint,cnn,latency")
    ap.add_argument("--only", default="", choices=("", "w8a8"),
                    help="w8a8: only the MobileNetV2 W8A8 row of section 1 (skips everything else)")
    ap.add_argument("--smollm", action="store_true", help="also SmolLM2-135M W8A8 +- SmoothQuant (slow)")
    ap.add_argument("--smollm-rows", default="", help="only these SmolLM2 rows (0-based comma list)")
    ap.add_argument("--cnn", default="mnist-cnn,fashion-resnet20",
                    help="full run: the classifiers of section 3b (fashion-resnet20 trains ~20 CPU min on first use)")
    ap.add_argument("--ablation", action="store_true",
                    help="W8A8 ablation: 8-bit activations alone per observer, +- cross-layer equalization")
    ap.add_argument("--eval-crops", type=int, default=0, help="evaluation crops (default 64 quick, 256 full)")
    ap.add_argument("--cal-crops", type=int, default=0, help="MobileNetV2 calibration crops (default 32 quick, "
                    "128 full; 32 reuses the --quick database in the full joint study)")
    ap.add_argument("--metrics", default="bops,bops_obc", help="joint study: BOP accountings (split runs)")
    ap.add_argument("--factors", default="", help="joint study: reductions, comma list (default 8,12 quick; "
                    "4,8,12,16 full)")
    ap.add_argument("--corrections", default="bn,bias", help="full run: statistics corrections to measure "
                    "(comma list of bn, bias; a left-out one prints nan)")
    ap.add_argument("--solvers", default="", help="joint study: only these of uniform,DP,DP+sel (split runs; the "
                    "DP+sel >= uniform bound is then checked only where both ran)")
    ap.add_argument("--evals", type=int, default=24, help="joint study: DP+sel's stitched evaluations per budget "
                    "(8 in --quick)")
    args = ap.parse_args()
    corrections = set(filter(None, args.corrections.split(",")))
    if corrections - CORRECTIONS:
        ap.error(f"--corrections: unknown {sorted(corrections - CORRECTIONS)}; use bn, bias")
    CORRECTIONS.intersection_update(corrections)
    SOLVERS.update(filter(None, args.solvers.split(",")))
    if SOLVERS - {"uniform", "DP", "DP+sel"}:
        ap.error(f"--solvers: unknown {sorted(SOLVERS - {'uniform', 'DP', 'DP+sel'})}; use uniform, DP, DP+sel")
    torch.set_num_threads(1)
    t_start, c_start = time.perf_counter(), time.process_time()
    skip = set(filter(None, args.skip.split(",")))
    metrics = tuple(filter(None, args.metrics.split(",")))
    facts = tuple(int(f) for f in filter(None, args.factors.split(",")))
    if args.only:
        skip |= {"joint", "cnn", "latency"}
    if args.quick:  # each bound once, on the smallest honest case; the MobileNetV2 W4A4 rows and joint search
        skip.add("joint")  # run in the full form only (the quick form checks their bounds on the digits CNN)
    failures: list[str] = []
    net, w8a8, spent, mark = None, None, {}, [time.process_time()]

    def lap(section: str) -> None:
        spent[section] = spent.get(section, 0.0) + time.process_time() - mark[0]
        mark[0] = time.process_time()

    if not {"ptq", "joint", "latency"} <= skip:
        net, imgs = mobilenet_v2(), photos()
        n_cal, n_score, n_eval = (32, 16, 64) if args.quick else (128, 64, 256)
        n_eval, n_cal = args.eval_crops or n_eval, args.cal_crops or n_cal
        x_cal = crops(imgs[0::2], n_cal, seed=1)
        x_score = crops(imgs[0::2], n_score, seed=3)
        x_eval = crops(imgs[1::2], n_eval, seed=2)
        calib = [x_cal[i:i + 8] for i in range(0, n_cal, 8)]
        scoring = [x_score[i:i + 16] for i in range(0, n_score, 16)]
        ref = logits_of(net, x_eval)
        say(f"MobileNetV2: {n_cal} calibration crops, {n_score} scoring crops, {n_eval} evaluation crops (other "
            f"photos)" + ("   [QUICK]" if args.quick else ""))
        lap("MobileNetV2 load + crops")
        if args.ablation:
            w8a8_ablation(net, calib, x_eval, ref)
            lap("W8A8 ablation")
    if "ptq" not in skip:
        w8a8 = ptq_rows(net, calib, x_eval, ref, args.quick, failures, w8a8_only=args.only == "w8a8" or args.quick)
        lap("1-2 MobileNetV2 PTQ")
    if args.quick and "ptq" not in skip and not args.only:
        classifier_w4a4("digits-cnn", failures)
        lap("2b digits W4A4")
    if "joint" not in skip:
        joint_rows(net, calib, scoring, x_eval, ref, args.quick, args.db + ("-quick" if args.quick else ""), failures,
                   metrics, facts, args.evals)
        lap("3 MobileNetV2 joint")
    if "cnn" not in skip:
        for name in (("digits-cnn",) if args.quick else args.cnn.split(",")):
            classifier_joint(name, args.quick, f"{args.db}-{name}" + ("-quick" if args.quick else ""), failures,
                             metrics, facts, args.evals)
        lap("3b classifier joint")
    if "latency" not in skip:
        linear_latency(args.quick, failures)
        lap("4a Linear latency")
        conv_latency(net, calib, x_eval, args.quick, failures, w8a8)
        lap("4b MobileNetV2 onnxruntime")
    if args.smollm and not args.only:
        smollm_rows(args.quick, failures, args.smollm_rows)
        lap("5 SmolLM2")
    say("\ncpu s per section: " + ", ".join(f"{k} {v:.0f}" for k, v in spent.items()))
    say(f"total {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - c_start:.0f} s cpu")
    for f in failures:
        say("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
