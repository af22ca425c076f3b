"""W8A8 MobileNetV2 diagnostics: the noise floor of the agreement metric, and our quantizers vs references.

Same crops as ``act_quant.py`` (calibration: seed 1 on the even photos; evaluation: seed 2 on the odd ones)::

    python bench/act_diag.py floor        # margins, fp16/bf16, input noise, reference RTN vs ours
    python bench/act_diag.py ao           # torch.ao FX static int8 (the field's reference)
    python bench/act_diag.py ours         # W8A8 RTN/GPTQ x minmax/mse, image input float, mean/std correction
    python bench/act_diag.py corr-rtn     # correct_mean_std_ (means only, +- classifier, on the eval crops), 512 cal
    python bench/act_diag.py bias         # correct_bias_ (each layer's own mean error) on RTN / GPTQ + mse
    python bench/act_diag.py best         # RTN + mse on 512 calibration crops + bias correction, +- image input float

Prints tables (agreement with the dense model, KL); diagnostics only, no bounds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import brainsurgeon as bs
from _vision import MEAN, STD, crops, damage, logits_of, mobilenet_v2, photos


def say(*a: object) -> None:
    print(*a, flush=True)


def row(label: str, ref: torch.Tensor, out: torch.Tensor, t0: float) -> None:
    """Agreement, KL, CPU s, agreement on the crops whose dense top-1/top-2 logit margin is >= 0.5."""
    a, k = damage(ref, out)
    top2 = ref.topk(2, dim=1).values
    sure = top2[:, 0] - top2[:, 1] >= 0.5
    a_sure = (ref.argmax(1) == out.argmax(1))[sure].float().mean().item()
    flips = (ref.argmax(1) != out.argmax(1)).nonzero().flatten().tolist()
    say(f"{label:<44}{100 * a:>7.1f}%{k:>9.5f}{time.process_time() - t0:>7.0f}{100 * a_sure:>8.1f}%  "
        f"flips {flips[:10]}")


def ref_rtn_(model: nn.Module, bits: int = 8) -> None:
    """Plain-torch reference: symmetric per-output-channel RTN, s = max|w| / (2^(b-1) - 1), codes in +-qmax."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                s = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / qmax
                s = s.view(-1, *[1] * (w.dim() - 1))
                w.copy_(torch.clamp(torch.round(w / s), -qmax, qmax) * s)


def floor(net, x_eval, ref) -> None:
    top2 = ref.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    p = ref.softmax(1).amax(1)
    qs = torch.tensor([0.05, 0.1, 0.25, 0.5])
    say(f"dense top-1/top-2 logit margin quantiles (5/10/25/50 %): {margin.quantile(qs).tolist()}")
    say(f"dense top-1 probability quantiles (5/10/25/50 %): {p.quantile(qs).tolist()}")
    for t in (0.05, 0.1, 0.25, 0.5, 1.0):
        say(f"  crops with margin < {t}: {(margin < t).float().mean().item() * 100:.1f} %")
    say(f"\n{'variant':<44}{'agree':>8}{'KL':>9}{'cpu s':>7}{'m>=0.5':>9}")
    for label, dt in [("weights cast to fp16 (fp32 compute)", torch.float16),
                      ("weights cast to bf16 (fp32 compute)", torch.bfloat16)]:
        t0 = time.process_time()
        m = copy.deepcopy(net)
        with torch.no_grad():
            for prm in m.parameters():
                prm.copy_(prm.to(dt).float())
        row(label, ref, logits_of(m, x_eval), t0)
    for label, dt in [("bf16 model and compute", torch.bfloat16), ("fp16 model and compute", torch.float16)]:
        t0 = time.process_time()
        try:
            m = copy.deepcopy(net).to(dt)
            row(label, ref, logits_of(m, x_eval.to(dt)).float(), t0)
        except RuntimeError as e:
            say(f"{label:<44} unavailable on CPU: {e}")
    std = STD.view(1, 3, 1, 1)
    x_pix = x_eval * std + MEAN.view(1, 3, 1, 1)  # back to [0, 1] pixels
    for label, xp in [("input pixels rounded to 1/255 (8-bit image)", torch.round(x_pix * 255) / 255),
                      ("input + uniform noise +-0.5/255 (seed 0)",
                       x_pix + (torch.rand(x_pix.shape, generator=torch.Generator().manual_seed(0)) - 0.5) / 255)]:
        t0 = time.process_time()
        row(label, ref, logits_of(net, (xp - MEAN.view(1, 3, 1, 1)) / std), t0)
    t0 = time.process_time()
    m = copy.deepcopy(net)
    ref_rtn_(m, 8)
    row("W8 reference RTN (plain torch, +-127)", ref, logits_of(m, x_eval), t0)
    t0 = time.process_time()
    m = copy.deepcopy(net)
    bs.quantize_(m, bs.RTN(bits=8, sym=True, mse=False))
    row("W8 bs.RTN(bits=8, sym=True, mse=False)", ref, logits_of(m, x_eval), t0)


def ao(net, calib, x_eval, ref) -> None:
    """torch.ao FX graph-mode static int8: per-channel weights, per-tensor activations."""
    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    w = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    variants = [
        ("torch.ao x86 default (hist, 7-bit acts), int8", get_default_qconfig_mapping("x86"), convert_fx),
        ("torch.ao hist 8-bit acts, reference QDQ", QConfigMapping().set_global(QConfig(
            activation=HistogramObserver.with_args(reduce_range=False), weight=w)), convert_to_reference_fx),
        ("torch.ao minmax 8-bit acts, reference QDQ", QConfigMapping().set_global(QConfig(
            activation=MinMaxObserver.with_args(reduce_range=False), weight=w)), convert_to_reference_fx),
    ]
    for label, qmap, convert in variants:
        t0 = time.process_time()
        m = prepare_fx(copy.deepcopy(net).eval(), qmap, example_inputs=(x_eval[:1],))
        with torch.no_grad():
            for b in calib:
                m(b)
        m = convert(m)
        row(label, ref, logits_of(m, x_eval), t0)


def w8a8(weights: str, observer: str, first_float: bool = False, mode: str = "dense") -> bs.Recipe:
    """The bench's W8A8 (8-bit asym per-tensor activations, 8-bit sym per-channel weights) by the public recipe."""
    act = bs.ActQuant(bits=8, observer=observer)
    wq = bs.GPTQ(bits=8, sym=True) if weights == "GPTQ" else bs.RTN(bits=8, sym=True, mse=False)
    ign = (r"features\.0\.0",) if first_float else ()
    return bs.Recipe((bs.Step(act, ignore=ign), bs.Step(wq)), bs.CalibOptions(mode=mode))


def ours(net, calib, scoring, x_eval, ref) -> None:
    from brainsurgeon.calib import recalib
    from brainsurgeon.quant.act import act_quant_layers

    say(f"\n{'variant':<44}{'agree':>8}{'KL':>9}{'cpu s':>7}{'m>=0.5':>9}")
    base = None
    for label, recipe in [("W8A8 RTN + minmax", w8a8("RTN", "minmax")),
                          ("W8A8 GPTQ + minmax (bench row)", w8a8("GPTQ", "minmax")),
                          ("W8A8 GPTQ + mse", w8a8("GPTQ", "mse")),
                          ("W8A8 GPTQ + mse, image input float", w8a8("GPTQ", "mse", first_float=True))]:
        t0 = time.process_time()
        m = copy.deepcopy(net)
        bs.compress(m, recipe, calib)
        row(label, ref, logits_of(m, x_eval), t0)
        if label == "W8A8 GPTQ + mse":
            base = m
    names = list(act_quant_layers(base))
    orig = recalib._correct_layer_

    def mean_only(module, mean_c, std_c, mean_d, std_d):
        orig(module, mean_c, std_c, mean_d, std_c)  # s = 1

    for label, data, fn, skip_head in [("  + mean/std corr (32 scoring crops)", scoring[:2], orig, False),
                                       ("  + mean/std corr (128 calib crops)", calib, orig, False),
                                       ("  + mean-only corr (32 scoring crops)", scoring[:2], mean_only, False),
                                       ("  + mean-only corr (128 calib crops)", calib, mean_only, False),
                                       ("  + mean-only corr, not classifier (128)", calib, mean_only, True)]:
        t0 = time.process_time()
        m = copy.deepcopy(base)
        recalib._correct_layer_ = fn
        try:
            recalib.correct_mean_std_(m, net, names[:-1] if skip_head else names, data)
        finally:
            recalib._correct_layer_ = orig
        row(label, ref, logits_of(m, x_eval), t0)


def corr(net, calib, scoring, x_eval, ref, which: list[str], n_cal2: int) -> None:
    """Statistics correction (std = gain / none / match) and more calibration crops, on W8A8 RTN/GPTQ + mse."""
    from brainsurgeon.calib.recalib import correct_mean_std_
    from brainsurgeon.quant.act import act_quant_layers

    say(f"\n{'variant':<44}{'agree':>8}{'KL':>9}{'cpu s':>7}{'m>=0.5':>9}")
    imgs = photos()
    x2 = crops(imgs[0::2], n_cal2, seed=5)  # more calibration crops: other seed, still the even photos
    calib2 = [x2[i:i + 8] for i in range(0, n_cal2, 8)]
    for wname in which:
        t0 = time.process_time()
        base = copy.deepcopy(net)
        bs.compress(base, w8a8(wname, "mse"), calib)
        row(f"W8A8 {wname} + mse (128 cal)", ref, logits_of(base, x_eval), t0)
        names = list(act_quant_layers(base))
        oracle = [x_eval[i:i + 16] for i in range(0, 64, 16)]  # diagnostic only: the first 64 eval crops
        for std, data, lab, head in [("none", scoring, "64 scoring", True),
                                     ("none", scoring, "64 scoring, not classifier", False),
                                     ("none", oracle, "ORACLE: eval crops 0-63", True),
                                     ("gain", scoring, "64 scoring", True)]:
            t0 = time.process_time()
            m = copy.deepcopy(base)
            correct_mean_std_(m, net, names if head else names[:-1], data, std=std)
            out = logits_of(m, x_eval)
            row(f"  + correction std={std} ({lab})", ref, out, t0)
            a, k = damage(ref[64:], out[64:])
            a0, k0 = damage(ref[64:], logits_of(base, x_eval[64:]))
            say(f"      on eval crops 64-255: {100 * a:.1f} % / KL {k:.5f} (uncorrected {100 * a0:.1f} % / {k0:.5f})")
        t0 = time.process_time()
        m = copy.deepcopy(net)
        bs.compress(m, w8a8(wname, "mse"), calib2)
        row(f"W8A8 {wname} + mse ({n_cal2} cal, seed 5)", ref, logits_of(m, x_eval), t0)


def bias(net, calib, scoring, x_eval, ref) -> None:
    """Empirical bias correction of each layer's own error (calib.correct_bias_), on W8A8 RTN / GPTQ + mse."""
    from brainsurgeon.calib import correct_bias_
    from brainsurgeon.quant.act import act_quant_layers

    say(f"\n{'variant':<44}{'agree':>8}{'KL':>9}{'cpu s':>7}{'m>=0.5':>9}")
    for wname in ("RTN", "GPTQ"):
        t0 = time.process_time()
        base = copy.deepcopy(net)
        bs.compress(base, w8a8(wname, "mse"), calib)
        row(f"W8A8 {wname} + mse (128 cal)", ref, logits_of(base, x_eval), t0)
        names = list(act_quant_layers(base))
        for data, lab in [(scoring, "64 scoring crops"), (calib, "128 calibration crops")]:
            t0 = time.process_time()
            m = copy.deepcopy(base)
            correct_bias_(m, net, names, data)
            row(f"  + bias correction ({lab})", ref, logits_of(m, x_eval), t0)


def best(net, scoring, x_eval, ref, n_cal2: int) -> None:
    """W8A8 RTN + mse on more calibration crops (seed 5), + bias correction; and the same with the image input float."""
    from brainsurgeon.calib import correct_bias_
    from brainsurgeon.quant.act import act_quant_layers

    say(f"\n{'variant':<44}{'agree':>8}{'KL':>9}{'cpu s':>7}{'m>=0.5':>9}")
    x2 = crops(photos()[0::2], n_cal2, seed=5)
    calib2 = [x2[i:i + 8] for i in range(0, n_cal2, 8)]
    for first_float in (False, True):
        t0 = time.process_time()
        m = copy.deepcopy(net)
        bs.compress(m, w8a8("RTN", "mse", first_float=first_float), calib2)
        lab = ", image input float" if first_float else ""
        row(f"W8A8 RTN + mse ({n_cal2} cal{lab})", ref, logits_of(m, x_eval), t0)
        t0 = time.process_time()
        correct_bias_(m, net, list(act_quant_layers(m)), scoring)
        row("  + bias correction (64 scoring crops)", ref, logits_of(m, x_eval), t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=("floor", "ao", "ours", "corr-rtn", "corr-gptq", "bias", "best"))
    ap.add_argument("--cal2", type=int, default=512, help="calibration crops of the 'more data' rows")
    ap.add_argument("--eval-crops", type=int, default=256)
    ap.add_argument("--cal-crops", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, imgs = mobilenet_v2(), photos()
    x_cal = crops(imgs[0::2], args.cal_crops, seed=1)
    x_eval = crops(imgs[1::2], args.eval_crops, seed=2)
    calib = [x_cal[i:i + 8] for i in range(0, len(x_cal), 8)]
    ref = logits_of(net, x_eval)
    say(f"MobileNetV2: {len(x_cal)} calibration crops (seed 1, even photos), {len(x_eval)} evaluation crops "
        f"(seed 2, odd photos)")
    if "floor" in args.parts:
        floor(net, x_eval, ref)
    if "ao" in args.parts:
        ao(net, calib, x_eval, ref)
    if "ours" in args.parts:
        x_score = crops(imgs[0::2], 64, seed=3)
        ours(net, calib, [x_score[i:i + 16] for i in range(0, 64, 16)], x_eval, ref)
    if "bias" in args.parts:
        x_score = crops(imgs[0::2], 64, seed=3)
        bias(net, calib, [x_score[i:i + 16] for i in range(0, 64, 16)], x_eval, ref)
    if "best" in args.parts:
        x_score = crops(imgs[0::2], 64, seed=3)
        best(net, [x_score[i:i + 16] for i in range(0, 64, 16)], x_eval, ref, args.cal2)
    which = [p.split("-")[1].upper() for p in args.parts if p.startswith("corr-")]
    if which:
        x_score = crops(imgs[0::2], 64, seed=3)
        corr(net, calib, [x_score[i:i + 16] for i in range(0, 64, 16)], x_eval, ref, which, args.cal2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
