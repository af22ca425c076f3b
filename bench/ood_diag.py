"""Why GPTQ loses single-word similarity on all-mpnet-base-v2 (issue 15): a diagnosis, not a bench.

    python bench/ood_diag.py --part loc     # 1. GPTQ on one family / half of the layers, the rest RTN
    python bench/ood_diag.py --part stats   # 2. per-layer input statistics, word inputs vs calibration
    python bench/ood_diag.py --part reg     # 3. damping / act-order on the default config

Setup and scores are bench/calib_ood.py's (``encoder_setup`` / ``encoder_eval``): 4-bit g128, 16 news
sentences, ID = cosine to dense on 128 held-out sentences, OOD = SimLex-999 / WS-353 rho of words embedded
alone ("<s> word </s>"). Every model is built with the public ``quantize_``; part 1 gives the GPTQ step
per-layer ``overrides`` of RTN (same bits / group) for the layers not under test.

Part 2 statistics (dense model, inputs of every Linear; H = X^T X / n over the calibration tokens with the
library's length mix, ``calib.short_prefixes``; delta = 0.01 mean diag H, GPTQ's damping):
  low  : fraction of a token's energy in H's eigen-directions with eigenvalue < delta (directions the
         calibration barely excites), word tokens by kind (<s>, content, </s>) and calibration tokens;
  lev  : damped leverage x^T (H + delta I)^-1 x / d, mean over word content tokens / mean over calibration;
  err  : layer-local relative output error ||(W_q - W) x||^2 / ||W x||^2 with dense inputs, GPTQ default
         over RTN, on word tokens by kind and on calibration tokens (> 1: GPTQ worse than RTN there);
  amax : the largest |x| of a token kind and its channel (massive activations).

Findings: see the bottom of this docstring (filled in from the measured tables).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import brainsurgeon as bs  # noqa: E402
from calib_ood import encoder_eval, encoder_setup  # noqa: E402

Q = {"bits": 4, "group_size": 128}
FAMILIES = {"qkv": r".*attn\.[qkv]", "attn.o": r".*attn\.o", "ffn1": r".*intermediate\.dense",
            "ffn2": r".*output\.dense"}
HALVES = {"layers 0-5": r"encoder\.layer\.[0-5]\..*", "layers 6-11": r"encoder\.layer\.([6-9]|1[01])\..*"}


def build(s: dict, cfg, overrides=()) -> torch.nn.Module:
    m = copy.deepcopy(s["model"])
    bs.quantize_(m, cfg, None if isinstance(cfg, bs.RTN) else s["calib"], ignore=s["ignore"],
                 overrides=overrides, options=bs.CalibOptions(blocks=s["blocks"]))
    return m


def row(s: dict, label: str, cfg, overrides=()) -> None:
    c0 = time.process_time()
    r = encoder_eval(s, build(s, cfg, overrides))
    print(f"{label:<34} {r['id']:>8.4f} {r['word_cos']:>9.4f} {r['simlex']:>8.4f} {r['ws353']:>8.4f} "
          f"{time.process_time() - c0:>7.1f}", flush=True)


def header() -> None:
    print(f"{'variant':<34} {'ID cos':>8} {'word cos':>9} {'SimLex':>8} {'WS-353':>8} {'CPU s':>7}")


def part_loc(s: dict) -> None:
    """GPTQ (default) only where `pat` matches; RTN on the other encoder Linears (an override)."""
    header()
    row(s, "RTN everywhere", bs.RTN(**Q))
    row(s, "GPTQ everywhere (default)", bs.GPTQ(**Q))
    for name, pat in {**FAMILIES, **HALVES}.items():
        row(s, f"GPTQ on {name} only", bs.GPTQ(**Q), {rf"(?!{pat}$).*": bs.RTN(**Q)})


def part_reg(s: dict) -> None:
    header()
    for label, kw in (("GPTQ default", {}), ("  damp 0.1", {"damp": 0.1}), ("  damp 1.0", {"damp": 1.0}),
                      ("  act-order off", {"act_order": False}), ("  shrink 0.6", {"shrink": 0.6})):
        row(s, label, bs.GPTQ(**Q, **kw))


@torch.inference_mode()
def capture(model, batches, names) -> dict[str, list[torch.Tensor]]:
    """Inputs (non-padding tokens) of the named Linears, one tensor per batch, plus the token ids."""
    mods = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in (*names, "_ids")}
    mask = {}
    hooks = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: out[n].append(a[0][mask["m"]].float()))
             for n in names]
    for b in batches:
        mask["m"] = b["attention_mask"].bool()
        out["_ids"].append(b["input_ids"][mask["m"]])
        model(**b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def part_stats(s: dict, n_words: int) -> None:
    from _text import sentence_batches
    from brainsurgeon.calib.lengths import short_prefixes

    tok, dense = s["tok"], s["model"]
    names = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    mix = [kw for _, kw in short_prefixes([((), b) for b in s["calib"]])]
    cal = capture(dense, s["calib"] + mix, names)
    words = s["words"][:: max(1, len(s["words"]) // n_words)][:n_words]
    wx = capture(dense, sentence_batches(tok, words, 64, 32), names)
    ids = wx["_ids"]
    kinds = {"<s>": ids == tok.bos_token_id, "word": (ids != tok.bos_token_id) & (ids != tok.eos_token_id),
             "</s>": ids == tok.eos_token_id}
    gptq, rtn = build(s, bs.GPTQ(**Q)), build(s, bs.RTN(**Q))
    mg, mr = dict(gptq.named_modules()), dict(rtn.named_modules())
    print(f"calibration tokens {len(cal['_ids'])} (with the length mix), word tokens {len(ids)} "
          f"({n_words} words: " + ", ".join(f"{k} {int(v.sum())}" for k, v in kinds.items()) + ")")
    print(f"{'layer':<30} {'rank':>5} | {'low: <s>':>8} {'word':>6} {'</s>':>6} {'calib':>6} | {'lev w/c':>7} | "
          f"{'err G/R: <s>':>12} {'word':>6} {'</s>':>6} {'calib':>6} | {'amax <s> (ch)':>14} "
          f"{'</s> (ch)':>13} {'word':>6} {'calib':>6}")
    for n in names:
        X, Xw = cal[n].clone(), wx[n].clone()
        H = X.T @ X / len(X)
        delta = 0.01 * H.diagonal().mean()
        lam, U = torch.linalg.eigh(H)
        low = U[:, lam < delta]

        def lowfrac(x, low=low):
            return float(((x @ low) ** 2).sum() / (x ** 2).sum())

        Hi = torch.linalg.inv(H + delta * torch.eye(len(H)))
        lev = lambda x, Hi=Hi: (x @ Hi * x).sum(1).mean() / x.shape[1]  # noqa: E731
        W = dense.get_submodule(n).weight.detach().float()
        dg, dr = mg[n].weight.float() - W, mr[n].weight.float() - W

        def err(x, W=W, dg=dg, dr=dr):
            y = (x @ W.T).pow(2).sum()
            return float((x @ dg.T).pow(2).sum() / y) / float((x @ dr.T).pow(2).sum() / y)

        def amax(x):
            a = x.abs().max(0)
            v, c = a.values.max(0)
            return float(v), int(a.values.argmax())

        rank = int((lam > 1e-6 * lam.max()).sum())
        ab, ae, aw, ac = (amax(Xw[kinds["<s>"]]), amax(Xw[kinds["</s>"]]), amax(Xw[kinds["word"]]), amax(X))
        print(f"{n.replace('encoder.layer.', 'L'):<30} {rank:>5} | "
              + " ".join(f"{lowfrac(Xw[k]):>{w}.3f}" for k, w in zip(kinds.values(), (8, 6, 6), strict=True))
              + f" {lowfrac(X):>6.3f} | {float(lev(Xw[kinds['word']]) / lev(X)):>7.2f} | "
              + " ".join(f"{err(Xw[k]):>{w}.2f}" for k, w in zip(kinds.values(), (12, 6, 6), strict=True))
              + f" {err(X):>6.2f} | {ab[0]:>7.1f} ({ab[1]:>4}) {ae[0]:>6.1f} ({ae[1]:>4}) {aw[0]:>6.1f} {ac[0]:>6.1f}",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("loc", "stats", "reg"), required=True)
    ap.add_argument("--model", choices=("minilm", "mpnet"), default="mpnet")
    ap.add_argument("--n-words", type=int, default=300, help="part stats: words (every k-th of the vocabulary)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = encoder_setup(args.model)
    print(f"{args.model}, 4-bit g128, calibration 16 sentences ({s['ntok']} tokens)", flush=True)
    {"loc": part_loc, "reg": part_reg}.get(args.part, lambda s: part_stats(s, args.n_words))(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
