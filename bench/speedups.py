"""Measured speed and size of the real output formats: packed int8/int4, sparse storage, structural pruning.

Three tables, every number measured in this run (CPU, 1 intra-op thread unless --threads):

1. MiniLM (all-MiniLM-L6-v2, ASSETS.md): every encoder Linear packed int8 / int4 weight-only (RTN
   grid; bf16 activations into the aten kernels) and dynamic int8, vs fp32: latency at batch 1 and
   32 sequences of 128 tokens, safetensors size of the state_dict, cosine to the dense embeddings.
2. Unstructured (CSR) and 16x16-block (BSR) sparsity: latency of Linear(768, 3072) and
   Linear(3072, 768) at batch 1 and 32 vs dense, and the break-even sparsity.
3. ResNet-50 (random weights) pruned structurally (``prune_``, 32 % of the channels of every
   coupled group, multiples of 16 kept -> ~50 % MACs): measured speed-up vs the MAC reduction
   at batch 32 and 1.

    $ .venv/bin/python bench/speedups.py --quick     # < ~1 min on 2 idle cores; exit 1 if a bound fails
    $ .venv/bin/python bench/speedups.py             # batch 32, 224 px, more sparsities, longer timings

Timings on a loaded machine are noisy: variants are timed in interleaved rounds and the median
and IQR reported; ratios between variants are more trustworthy than absolute times.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from brainsurgeon.quant import (  # noqa: E402
    Pack,
    SparseLinear,
    compare_latency,
    format_speed_table,
    pack_,
    time_call,
)
from brainsurgeon.quant.sparse import break_even  # noqa: E402

FAILS: list[str] = []


def bound(ok: bool, text: str) -> None:
    """Record and print a stated bound."""
    print(f"  [{'ok' if ok else 'FAIL'}] {text}")
    if not ok:
        FAILS.append(text)


def st_size(model: nn.Module) -> int:
    """Bytes of the model's state_dict written as one safetensors file."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.safetensors")
        save_file(sd, p)
        return os.path.getsize(p)


# ----------------------------------------------------------------------------- 1. MiniLM


class Encoder(nn.Module):
    """A BertModel called with keyword tensors, returning mean-pooled, normalized sentence embeddings."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return nn.functional.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1)


def minilm(quick: bool, threads: int, min_time: float, clock: str) -> None:
    from _text import load_minilm, topic_sentences, topics_text

    tok, bert = load_minilm()
    dense = Encoder(bert).eval()
    variants: dict[str, nn.Module] = {"fp32 dense": dense}
    mse = not quick  # the MSE range search of the RTN grid costs ~20 s on 2 loaded cores
    packs = {"int8 weight-only": Pack(bits=8, group_size=0, rtn=True, mse=False),
             "int4 weight-only g128": Pack(bits=4, group_size=128, rtn=True, mse=mse),
             "int8 dynamic": Pack(bits=8, group_size=0, activations="dynamic_int8", rtn=True, mse=False)}
    kernels = {}
    for name, cfg in packs.items():
        m = copy.deepcopy(dense)
        rows = pack_(m.bert.encoder, cfg)
        kernels[name] = rows[0].kernel
        variants[name] = m
    m = copy.deepcopy(variants["int8 dynamic"])  # same int8 weights, per-token activation scales
    for layer in m.modules():
        if hasattr(layer, "backend"):
            layer.backend = "int_mm"
    variants["int8 dynamic (int_mm)"] = m
    kernels["int8 dynamic (int_mm)"] = m.bert.encoder.layer[0].attention.self.query.kernel
    if not quick:  # how much of the weight-only speed comes from bf16 activations alone
        variants["bf16 dense (all weights)"] = copy.deepcopy(dense).to(torch.bfloat16)

    words = topics_text().split()
    text = [" ".join(words[i * 120:(i + 1) * 120]) for i in range(32)]  # >= 128 tokens each
    batches = (1, 8) if quick else (1, 32)
    inputs = {b: dict(tok(text[:b], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
              for b in batches}
    rows = compare_latency(variants, inputs, threads=threads, min_run_time=min_time, rounds=1 if quick else 2,
                           warmup=1, clock=clock)

    _, held = topic_sentences(0, 32 if quick else 256)
    enc = dict(tok(held, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    with torch.inference_mode():
        ref = dense(**enc)
        cos = {n: (m(**enc) * ref).sum(-1) for n, m in variants.items()}
    sizes = {n: st_size(m) for n, m in variants.items()}
    lin_bytes = {n: sum(t.numel() * t.element_size() for t in m.bert.encoder.state_dict().values())
                 for n, m in variants.items()}

    print(f"\n## MiniLM-L6 encoder Linears packed vs fp32 ({threads} thread(s); sequences of 128 tokens)")
    print(format_speed_table(rows))
    print(f"\n{'variant':<26} {'state_dict MB':>13} {'x fp32':>7} {'encoder MB':>10} {'x fp32':>7} "
          f"{'cos mean':>9} {'cos min':>8}  kernel")
    base, base_enc = sizes["fp32 dense"], lin_bytes["fp32 dense"]
    for n in variants:
        print(f"{n:<26} {sizes[n] / 1e6:>13.2f} {sizes[n] / base:>7.3f} {lin_bytes[n] / 1e6:>10.2f} "
              f"{lin_bytes[n] / base_enc:>7.3f} {float(cos[n].mean()):>9.5f} {float(cos[n].min()):>8.5f}  "
              f"{kernels.get(n, 'torch dense')}")
    print(f"(cosine over {len(held)} held-out pydoc sentences; encoder MB = all encoder weights incl. LayerNorms)")
    sp = {(r.variant, r.batch): r.speedup for r in rows}
    big = max(batches)
    bound(float(cos["int8 weight-only"].mean()) >= 0.999 and float(cos["int8 weight-only"].min()) >= 0.995,
          "int8 weight-only: mean cosine to dense >= 0.999, min >= 0.995")
    # a regression guard, set from measured runs (0.945 min-max RTN on 32 sentences, 0.955 MSE range on 256)
    bound(float(cos["int4 weight-only g128"].mean()) >= 0.94,
          f"int4 weight-only g128 (RTN{', MSE range' if mse else ''}): mean cosine >= 0.94")
    bound(float(cos["int8 dynamic (int_mm)"].mean()) >= 0.99,
          "int8 dynamic, per-token activations (int_mm): mean cosine >= 0.99")
    bound(lin_bytes["int8 weight-only"] / base_enc <= 0.27, "int8: encoder bytes <= 0.27x fp32")
    bound(lin_bytes["int4 weight-only g128"] / base_enc <= 0.16, "int4 g128: encoder bytes <= 0.16x fp32")
    bound(sp[("int8 dynamic", big)] >= 1.0, f"int8 dynamic faster than fp32 at batch {big}")


def linear_kernels(quick: bool, threads: int, min_time: float, clock: str) -> None:
    """One Linear, every packed kernel, at 1 token (decoding-like) and 32 / 128 tokens."""
    from brainsurgeon.quant import pack_module

    g = torch.Generator().manual_seed(0)
    cfgs = {"int8 weight-only": Pack(bits=8, group_size=0, rtn=True, mse=False),
            "int4 weight-only g128": Pack(bits=4, group_size=128, rtn=True, mse=False),
            "int8 dynamic (fbgemm)": Pack(bits=8, group_size=0, activations="dynamic_int8", rtn=True, mse=False)}
    print(f"\n## One Linear layer, packed kernels vs fp32 F.linear ({threads} thread(s), {clock} clock): "
          f"speed-up over fp32 (fp32 ms in brackets)")
    tokens = (1, 32) if quick else (1, 32, 128)
    print(f"{'Linear(in, out)':<16} " + " ".join(f"{f'{t} tok':>22}" for t in tokens) + "   variant")
    for n_in, n_out in ((768, 3072), (3072, 768)):
        lin = nn.Linear(n_in, n_out)
        mods = {n: pack_module(lin, c, n) for n, c in cfgs.items()}
        mods["int8 dynamic (int_mm)"] = copy.deepcopy(mods["int8 dynamic (fbgemm)"])
        mods["int8 dynamic (int_mm)"].backend = "int_mm"
        cells: dict[str, list[str]] = {n: [] for n in mods}
        for t in tokens:
            x = torch.randn(t, n_in, generator=g)
            with torch.inference_mode():
                base = time_call(lambda x=x, lin=lin: lin(x), threads=threads, warmup=2, min_run_time=min_time,
                                 clock=clock)
                for n, m in mods.items():
                    tm = time_call(lambda m=m, x=x: m(x), threads=threads, warmup=2, min_run_time=min_time,
                                   clock=clock)
                    cells[n].append(f"{base.median_s / tm.median_s:>6.2f}x ({base.median_ms:6.3f} ms)")
        for n, c in cells.items():
            print(f"{f'({n_in}, {n_out})':<16} " + " ".join(f"{v:>22}" for v in c) + f"   {n}")


# ----------------------------------------------------------------------------- 2. sparse break-even


def _pruned_linear(n_in: int, n_out: int, sparsity: float, block: int, g: torch.Generator) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    keep = torch.rand(n_out // block, n_in // block, generator=g) >= sparsity
    keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    with torch.no_grad():
        lin.weight.mul_(keep)
    return lin


def _paired(dense_fn, sparse_fn, threads: int, min_time: float, clock: str,  # noqa: ANN001
            rounds: int = 3) -> tuple[float, float]:
    """Median seconds of dense and sparse, timed in alternating rounds so load drifts hit both alike."""
    d, s = [], []
    for _ in range(rounds):
        d += time_call(dense_fn, threads=threads, warmup=1, min_run_time=min_time / rounds, clock=clock).times
        s += time_call(sparse_fn, threads=threads, warmup=1, min_run_time=min_time / rounds, clock=clock).times
    return float(torch.tensor(d).median()), float(torch.tensor(s).median())


def sparse_break_even(quick: bool, threads: int, min_time: float, clock: str) -> None:
    sparsities = [0.7, 0.9, 0.95, 0.98] if quick else [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    g = torch.Generator().manual_seed(0)
    print(f"\n## Sparse matmul vs dense Linear ({threads} thread(s)): time sparse / time dense (median, each "
          f"paired with its own dense run; < 1 = sparse faster)")
    head = f"{'Linear(in, out)':<18} {'batch':>5} {'format':<7} {'dense ms':>8} " + " ".join(
        f"{s:>6.0%}" for s in sparsities) + "  break-even"
    print(head)
    print("-" * len(head))
    be: dict[tuple[int, int, str], float | None] = {}
    for n_in, n_out in ((768, 3072), (3072, 768)):
        for batch in (1, 32):
            x = torch.randn(batch, n_in, generator=g)
            W = torch.randn(n_out, n_in, generator=g)
            with torch.inference_mode():
                for fmt, block in (("csr", 1), ("bsr16", 16)):
                    ratios, dense_ms = [], []
                    for s in sparsities:
                        m = SparseLinear.from_linear(_pruned_linear(n_in, n_out, s, block, g), fmt[:3], block=16)
                        td, ts = _paired(lambda x=x, W=W: nn.functional.linear(x, W), lambda m=m, x=x: m(x),
                                         threads, min_time, clock, rounds=2 if quick else 3)
                        ratios.append(ts / td)
                        dense_ms.append(1e3 * td)
                    b = break_even(sparsities, 1.0, ratios)
                    be[(n_in, batch, fmt)] = b
                    cells = " ".join(f"{r:>6.2f}" for r in ratios)
                    dm = float(torch.tensor(dense_ms).median())
                    print(f"{f'({n_in}, {n_out})':<18} {batch:>5} {fmt:<7} {dm:>8.3f} "
                          f"{cells}  {'never' if b is None else f'{b:.1%}'}")
    print("(csr: unstructured sparsity, torch.sparse.mm; bsr16: whole 16x16 blocks zero, BSR matmul; break-even: "
          "from this sparsity on sparse stays faster, interpolated between measured points)")
    for n_in in (768, 3072):
        b = be[(n_in, 1, "csr")]
        bound(b is not None, f"CSR beats dense at batch 1 for in={n_in} at {sparsities[-1]:.0%} sparsity")


# ----------------------------------------------------------------------------- 3. ResNet-50


def resnet50(quick: bool, threads: int, min_time: float, clock: str) -> None:
    try:
        from brainsurgeon.prune.api import prune_
        from brainsurgeon.prune.config import ChannelPruning
    except ImportError as e:  # the structural pruner has not landed in this checkout
        print(f"\n## ResNet-50 structural pruning: skipped ({e})")
        return
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet50(weights=None).eval()
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    # 32 % of the channels of every coupled group, kept counts rounded to multiples of 16 (AVX-512
    # fp32 lanes: odd channel counts waste vector width) -> ~50 % of the MACs
    prune_(pruned, ChannelPruning(ratio=0.32, importance="l2", round_to=16),
           example_inputs=torch.randn(1, 3, 64, 64))
    secs = time.perf_counter() - t0
    px, batches = (112, (1, 8)) if quick else (224, (1, 32))
    inputs = {b: torch.randn(b, 3, px, px) for b in batches}
    rows = compare_latency({"dense": dense, "pruned 32% ch. (x16)": pruned}, inputs, threads=threads,
                           min_run_time=min_time * (2 if quick else 4), rounds=2, warmup=1, clock=clock)
    print(f"\n## ResNet-50 (random weights) pruned structurally with prune_ ({secs:.1f} s), {px}x{px} px, "
          f"{threads} thread(s)")
    print(format_speed_table(rows))
    big = [r for r in rows if r.batch == max(batches) and r.variant != "dense"][0]
    bound(big.efficiency >= 0.8, f"batch {big.batch}: measured speed-up {big.speedup:.2f}x >= 0.8 x MAC "
                                 f"reduction {big.mac_ratio:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced run (< ~1 min); exit 1 if a bound fails")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (default 1)")
    p.add_argument("--only", choices=("kernels", "minilm", "sparse", "resnet"), help="run one table")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu (default): CPU time of the 1-thread timing process, robust on a shared, "
                        "oversubscribed machine; wall: elapsed time (use on an idle machine or with --threads > 1)")
    args = p.parse_args(argv)
    min_time = 0.15 if args.quick else 0.6
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, timing threads {args.threads}, "
          f"clock {args.clock}, os.cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"
          + (" (shared machine: cpu clock = time on a core, not time waiting for one)" if args.clock == "cpu" else ""))
    for name, fn in (("kernels", linear_kernels), ("minilm", minilm), ("sparse", sparse_break_even),
                     ("resnet", resnet50)):
        if args.only in (None, name):
            fn(args.quick, args.threads, min_time, args.clock)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {len(FAILS)} bound(s) failed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
