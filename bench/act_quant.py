"""Activation quantization: W8A8 / W4A4 on MobileNetV2, OBC's joint 2:4 + WxAx search, int8 kernel latency.

    python bench/act_quant.py --quick     # 32 Hessian / 32 scoring / 64 evaluation crops, budgets 8x and 12x
    python bench/act_quant.py             # 128 / 64 / 256 crops, budgets 4x 8x 12x 16x, statistics correction

MobileNetV2 (torchvision ImageNet weights), damage against the dense model on random crops of real
photos (``bench/_vision.py``: top-1 agreement and KL on evaluation crops of photos never used for
calibration):

1. W8A8 static: 8-bit symmetric per-channel weights (GPTQ), 8-bit asymmetric per-tensor activations
   (min-max observer) at every conv/linear input. Bound: >= 97 % agreement.
2. W4A4: round-to-nearest weights + min-max activations vs GPTQ weights + MSE activations (the first
   conv and the classifier stay at W8A8 in both). Bound: GPTQ + MSE has the lower KL.
3. The joint search (OBC, Frantar & Alistarh 2022): per layer dense, 8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a
   (SparseGPT 2:4, GPTQ asymmetric per-channel weights, static per-tensor MSE activations; Hessians of
   the quantized inputs; per-entry output distortion as the score), DP vs uniform at each budget in
   both accountings: ``bops`` = MACs x w_bits x a_bits (dense fp32 = 32 x 32) and ``bops_obc`` = MACs x
   max(w_bits, a_bits) (dense 32; OBC's code: 8w8a = 4x, 4w4a = 8x, 2:4 + 4w4a = 16x). Plans are stitched
   from the database, activation scales calibrated on the stitched model; "corr" then matches each
   layer's output mean/std to the dense model's (OBC's statistics correction). Bound: DP's agreement
   >= uniform's wherever both meet the budget.

Latency (1 thread, CPU time, interleaved rounds): MiniLM encoder with static W8A8 Linears
(``torch._int_mm``) vs fp32 in torch; MobileNetV2 exported as ONNX QDQ with the calibrated scales
vs the fp32 export, both in onnxruntime. Bound: int8 faster than fp32 at batch 32 on both.
Exit 1 if a bound fails.
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
from brainsurgeon.calib.recalib import correct_mean_std_
from brainsurgeon.errors import BudgetInfeasibleError
from brainsurgeon.quant import compare_latency, format_speed_table
from brainsurgeon.quant.act import act_quant_layers
from brainsurgeon.quant.static import convert_static_int8_
from brainsurgeon.search import Budget, SearchSpace, build_database, dp_plan, stitch_, uniform_plan

JOINT = ("8w8a", "4w4a", "2:4+8w8a", "2:4+4w4a")
EDGE = ("features.0.0", "classifier.1")  # first conv, classifier: W8A8 in the W4A4 rows


def say(*a: object) -> None:
    print(*a, flush=True)


def w4a4(weights: str, observer: str) -> bs.Recipe:
    wcfg = bs.GPTQ(bits=4, sym=False) if weights == "GPTQ" else bs.RTN(bits=4, sym=False, mse=False)
    w8 = bs.GPTQ(bits=8, sym=True) if weights == "GPTQ" else bs.RTN(bits=8, sym=True, mse=False)
    over = tuple((n.replace(".", r"\."), bs.ActQuant(bits=8)) for n in EDGE)
    wover = tuple((n.replace(".", r"\."), w8) for n in EDGE)
    return bs.Recipe((bs.Step(bs.ActQuant(bits=4, observer=observer), overrides=over), bs.Step(wcfg, overrides=wover)),
                     bs.CalibOptions(mode="dense"))


def ptq_rows(net, calib, scoring, x_eval, ref, quick, failures, w8a8_only: bool = False) -> None:
    rows = []
    recipes = [("W8A8 GPTQ + minmax", bs.W8A8("GPTQ", options=bs.CalibOptions(mode="dense")))]
    if not w8a8_only:
        recipes += [("W4A4 RTN + minmax", w4a4("RTN", "minmax")), ("W4A4 GPTQ + mse", w4a4("GPTQ", "mse"))]
    for name, recipe in recipes:
        m = copy.deepcopy(net)
        t0 = time.process_time()
        bs.compress(m, recipe, calib)
        agree, kl = damage(ref, logits_of(m, x_eval))
        a2 = k2 = float("nan")
        if not quick:  # OBC's statistics correction (one pass per layer: slow on 2 cores)
            correct_mean_std_(m, net, list(act_quant_layers(m)), scoring[:2])
            a2, k2 = damage(ref, logits_of(m, x_eval))
        rows.append((name, agree, kl, a2, k2, time.process_time() - t0))
    say("\n1-2. MobileNetV2 PTQ, damage vs dense (agreement / KL); corr = output mean/std matched to dense")
    say(f"{'method':<22}{'agree':>8}{'KL':>9}{'corr agree':>12}{'corr KL':>9}{'cpu s':>7}")
    for name, a, k, a2, k2, sec in rows:
        say(f"{name:<22}{100 * a:>7.1f}%{k:>9.4f}{100 * a2:>11.1f}%{k2:>9.4f}{sec:>7.0f}")
    if rows[0][1] < 0.97:
        failures.append(f"W8A8 agreement {rows[0][1]:.4f} < 0.97")
    if len(rows) == 3 and rows[2][2] > rows[1][2]:
        failures.append(f"W4A4 GPTQ+mse KL {rows[2][2]:.4f} > RTN+minmax KL {rows[1][2]:.4f}")


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


def joint_rows(net, calib, scoring, x_eval, ref, quick, db, failures) -> None:
    space = SearchSpace(prune_method="SparseGPT", quant_method="GPTQ", levels=0, nm=(), block_sparsities=(), bits=(),
                        nm_bits=(), joint=JOINT, act_observer="mse", quant_sym=False,
                        model_loss_batches=1 if quick else 2)
    t0 = time.process_time()
    table = build_database(net, space, calib, db)
    n = sum(len(v) for v in table.entries.values())
    say(f"\n3. joint database: {n} entries over {len(table.layers)} layers ({table.computed} computed now, "
        f"{time.process_time() - t0:.0f} cpu s)")
    facts = (8, 12) if quick else (4, 8, 12, 16)
    rows = []
    for metric in ("bops", "bops_obc"):
        for f in facts:
            budget = Budget(metric, 1 / f)
            got = {}
            for solver, solve in (("uniform", uniform_plan), ("DP", dp_plan)):
                try:
                    plan = solve(table, budget)
                except BudgetInfeasibleError as e:
                    rows.append((budget, f, solver, None, str(e).split(";")[0][:60]))
                    continue
                m = stitch_(copy.deepcopy(net), plan, table, calib)
                agree, kl = damage(ref, logits_of(m, x_eval))
                got[solver] = agree
                corr = ""
                if not quick:
                    correct_mean_std_(m, net, table.layers, scoring[:2])
                    a2, k2 = damage(ref, logits_of(m, x_eval))
                    corr = f"{100 * a2:.1f}% / {k2:.4f}"
                counts = {v: plan.variants.count(v) for v in dict.fromkeys(plan.variants)}
                rows.append((budget, f, solver, (plan.info["cost"], agree, kl, corr),
                             " ".join(f"{v}x{c}" for v, c in counts.items())))
                if plan.info["cost"] > budget.fraction + 1e-9:
                    failures.append(f"{budget}: {solver} cost {plan.info['cost']} over budget")
            if "DP" in got and "uniform" in got and got["DP"] < got["uniform"]:
                failures.append(f"{budget}: DP agreement {got['DP']:.4f} < uniform {got['uniform']:.4f}")
    say("joint DP vs uniform (stitched; agreement / KL vs dense" + ("" if quick else "; corr: statistics corrected")
        + ")")
    say(f"{'budget':<16}{'reduction':>10}{'solver':>9}{'cost':>9}{'agree':>8}{'KL':>9}{'corr':>17}  variants")
    for budget, f, solver, res, variants in rows:
        if res is None:
            say(f"{str(budget):<16}{f:>9}x{solver:>9}  infeasible: {variants}")
            continue
        cost, agree, kl, corr = res
        say(f"{str(budget):<16}{f:>9}x{solver:>9}{cost:>9.4f}{100 * agree:>7.1f}%{kl:>9.4f}{corr:>17}  {variants}")
    say("OBC (paper, ResNet18/34/50 on ImageNet, joint 2:4 + WxAx at 12x BOPs in its own accounting): about 2.5 % "
        "relative accuracy drop; compare with the bops_obc=0.0833 rows (agreement with dense on photo crops here, "
        "not ImageNet accuracy, and MobileNetV2, not a ResNet).")


def latency_rows(net, calib, x_eval, quick, failures) -> None:
    import onnxruntime as ort

    from _text import load_minilm, sentence_batches, topic_sentences

    tok, bert = load_minilm()
    cal_txt, held = topic_sentences(16 if quick else 64, 64)
    m = copy.deepcopy(bert)
    bs.compress(m, bs.W8A8("RTN"), sentence_batches(tok, cal_txt, 16))
    convert_static_int8_(m)
    hb = sentence_batches(tok, held, 32)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(bert(**hb[0]).last_hidden_state,
                                                    m(**hb[0]).last_hidden_state, dim=-1).mean().item()
    rows = compare_latency({"MiniLM fp32": bert, "MiniLM W8A8 int8": m},
                           {1: {k: v[:1] for k, v in hb[0].items()}, 32: hb[0]}, clock="cpu",
                           min_run_time=0.5 if quick else 2.0)
    say(f"\n4. latency, 1 thread, CPU time; MiniLM seq {hb[0]['input_ids'].shape[1]}, token cosine int8 vs fp32 "
        f"{cos:.4f}")
    say(format_speed_table(rows).replace("MAC ratio", "   (n/a)"))
    r32 = next(r for r in rows if r.batch == 32 and "int8" in r.variant)
    if r32.speedup <= 1.0:
        failures.append(f"MiniLM W8A8 int8 not faster than fp32 at batch 32 ({r32.speedup:.2f}x)")
    q = copy.deepcopy(net)
    bs.compress(q, bs.W8A8("RTN"), calib)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    say(f"{'MobileNetV2 onnxruntime':<28}{'batch':>6}{'fp32 ms':>9}{'int8 ms':>9}{'speed-up':>9}{'agree':>8}")
    with tempfile.TemporaryDirectory() as d:
        dyn = ({0: "batch"},)  # one export serves both batch sizes
        bs.export_onnx(net, (x_eval[:2],), os.path.join(d, "fp32.onnx"), dynamic_shapes=dyn)
        bs.export_onnx(q, (x_eval[:2],), os.path.join(d, "int8.onnx"), quantized="qdq", atol=float("inf"),
                       dynamic_shapes=dyn)
        sess = {k: ort.InferenceSession(os.path.join(d, f"{k}.onnx"), opts, providers=["CPUExecutionProvider"])
                for k in ("fp32", "int8")}
        for b in (1, 32):
            x = x_eval[:b]
            feed = {sess["fp32"].get_inputs()[0].name: x.numpy()}
            times: dict[str, list[float]] = {k: [] for k in sess}
            for _ in range((10 if b == 1 else 3) * (1 if quick else 3)):
                for k, s in sess.items():
                    s.run(None, feed)
                    t0 = time.process_time()
                    s.run(None, feed)
                    times[k].append(time.process_time() - t0)
            med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
            agree = damage(logits_of(net, x), torch.from_numpy(sess["int8"].run(None, feed)[0]))[0]
            say(f"{'':<28}{b:>6}{med['fp32']:>9.2f}{med['int8']:>9.2f}{med['fp32'] / med['int8']:>8.2f}x"
                f"{100 * agree:>7.1f}%")
            if b == 32 and med["int8"] >= med["fp32"]:
                failures.append(f"MobileNetV2 ORT int8 not faster than fp32 at batch 32 ({med['int8']:.1f} ms)")


def smollm_rows(quick: bool) -> None:
    """SmolLM2-135M: perplexity of W8A8 (RTN weights) per-token dynamic and static per-tensor activations,
    with and without SmoothQuant (alpha 0.5), and W4A8 (GPTQ 4-bit g0 + static 8-bit), vs dense."""
    from _text import load_smollm, perplexity, token_windows

    tok, lm = load_smollm()
    n_cal, n_eval, length = (4, 2, 256) if quick else (16, 8, 512)
    cal = [{"input_ids": w} for w in token_windows(tok, n_cal, length, from_end=True)]
    evals = token_windows(tok, n_eval, length)
    say(f"\n5. SmolLM2-135M perplexity, {n_cal} x {length} calibration tokens, {n_eval} x {length} evaluation "
        f"tokens (lm_head kept float)")
    say(f"{'method':<42}{'ppl':>9}{'cpu s':>7}")
    say(f"{'dense':<42}{perplexity(lm, evals):>9.2f}")
    opts = bs.CalibOptions(mode="dense")
    for name, recipe in [
        ("W8A8 per-token dynamic", bs.W8A8("RTN", granularity="token", options=opts)),
        ("W8A8 static per-tensor", bs.W8A8("RTN", options=opts)),
        ("W8A8 static per-tensor + SmoothQuant 0.5", bs.W8A8("RTN", options=opts, smooth=0.5)),
        ("W4A8 static (GPTQ 4-bit) + SmoothQuant 0.5",
         bs.Recipe((bs.Step(bs.ActQuant(bits=8, smooth=0.5)), bs.Step(bs.GPTQ(bits=4, group_size=128))), opts)),
    ]:
        m = copy.deepcopy(lm)
        t0 = time.process_time()
        recipe = bs.Recipe(tuple(bs.Step(st.method, ignore=("lm_head",)) for st in recipe.steps), recipe.calib)
        bs.compress(m, recipe, cal)
        say(f"{name:<42}{perplexity(m, evals):>9.2f}{time.process_time() - t0:>7.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", default="out/act-quant-db")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: ptq,joint,latency")
    ap.add_argument("--only", default="", choices=("", "w8a8"),
                    help="w8a8: only the MobileNetV2 W8A8 row of section 1 (skips everything else)")
    ap.add_argument("--smollm", action="store_true", help="also SmolLM2-135M W8A8 +- SmoothQuant (slow)")
    ap.add_argument("--ablation", action="store_true",
                    help="W8A8 ablation: 8-bit activations alone per observer, +- cross-layer equalization")
    ap.add_argument("--eval-crops", type=int, default=0, help="evaluation crops (default 64 quick, 256 full)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start, c_start = time.perf_counter(), time.process_time()
    net, imgs = mobilenet_v2(), photos()
    n_cal, n_score, n_eval = (32, 32, 64) if args.quick else (128, 64, 256)
    n_eval = args.eval_crops or n_eval
    x_cal = crops(imgs[0::2], n_cal, seed=1)
    x_score = crops(imgs[0::2], n_score, seed=3)
    x_eval = crops(imgs[1::2], n_eval, seed=2)
    calib = [x_cal[i:i + 8] for i in range(0, n_cal, 8)]
    scoring = [x_score[i:i + 16] for i in range(0, n_score, 16)]
    ref = logits_of(net, x_eval)
    say(f"MobileNetV2: {n_cal} calibration crops, {n_score} scoring crops, {n_eval} evaluation crops (other photos)")
    failures: list[str] = []
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= {"joint", "latency"}
    if args.ablation:
        w8a8_ablation(net, calib, x_eval, ref)
    if "ptq" not in skip:
        ptq_rows(net, calib, scoring, x_eval, ref, args.quick, failures, w8a8_only=args.only == "w8a8")
    if "joint" not in skip:
        joint_rows(net, calib, scoring, x_eval, ref, args.quick, args.db + ("-quick" if args.quick else ""), failures)
    if "latency" not in skip:
        latency_rows(net, calib, x_eval, args.quick, failures)
    if args.smollm and not args.only:
        smollm_rows(args.quick)
    say(f"\ntotal {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - c_start:.0f} s cpu")
    for f in failures:
        say("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
