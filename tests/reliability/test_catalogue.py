"""The catalogue: bad or unusual inputs per public verb, each with its expected outcome class.

Each case is (verb, case, make model, call, expected): expected is an error class plus a regex
that must name the object and the fix, or OK (a correct result, checked by the case's own
assertion). On every failure the model must be bit-identical AND object-identical (same
Parameter/Module objects, hooks, flags, requires_grad, grads): see reliability_state.

More cases live beside their bug's regression tests (test_calibration_inputs, test_ignore_and_configs,
test_checkpoint_*, test_cli_errors); `catalogue_counts()` sums them for the issue's note.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from reliability_state import assert_untouched, capture
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import CalibrationError, ConfigError, FormatError, UnsupportedModuleError
from brainsurgeon.export import load, save
from brainsurgeon.quant import pack_
from brainsurgeon.search import SearchSpace, search

OK = "ok"


def cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 4)).eval()
    m[5].register_forward_hook(lambda *a: None)  # hooks, grads and flags must survive a failure too
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    m[0].weight.requires_grad_(False)
    return m


def X(n: int = 2, c: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(n + c)
    return torch.randn(n, c, 8, 8, generator=g).to(dtype)


def gen(items):
    return (t for t in items)


def exhausted():
    g = gen([X()])
    list(g)
    return g


@dataclass
class Case:
    verb: str
    case: str
    call: Callable[[nn.Module], Any]
    expect: Any  # (ErrorClass, regex) or OK
    check: Callable[[nn.Module, Any], bool] | None = None
    model: Callable[[], nn.Module] = cnn


E = ExactOBS = bs.ExactOBS
CASES = [
    # ---------------------------------------------------------------- sparsify_
    Case("sparsify_", "empty calibration", lambda m: bs.sparsify_(m, E(sparsity=0.5), []),
         (CalibrationError, "calibration data is empty; pass a DataLoader")),
    Case("sparsify_", "exhausted generator", lambda m: bs.sparsify_(m, E(sparsity=0.5), exhausted()),
         (CalibrationError, "calibration data is empty")),
    Case("sparsify_", "NaN calibration", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X().fill_(math.nan)]),
         (CalibrationError, "non-finite.*check the data")),
    Case("sparsify_", "Inf calibration", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X().fill_(math.inf)]),
         (CalibrationError, "non-finite")),
    Case("sparsify_", "wrong channel count", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X(c=1)]),
         (CalibrationError, r"\[\(2, 1, 8, 8\) float32 cpu\].*3 input channels.*Fix the calibration data")),
    Case("sparsify_", "integer calibration", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X().long()]),
         (CalibrationError, "int64.*Fix the calibration data")),
    Case("sparsify_", "string batch", lambda m: bs.sparsify_(m, E(sparsity=0.5), ["text"]),
         (CalibrationError, "unsupported type str")),
    Case("sparsify_", "calib is a number", lambda m: bs.sparsify_(m, E(sparsity=0.5), 3),
         (CalibrationError, "not iterable")),
    Case("sparsify_", "fp16 calibration on fp32 model",
         lambda m: bs.sparsify_(m, E(sparsity=0.5), [X(dtype=torch.float16)]),
         OK, lambda m, r: any("cast" in n for n in r.notes) and float((m[5].weight == 0).float().mean()) == 0.5),
    Case("sparsify_", "generator with bn_reestimate",
         lambda m: bs.sparsify_(m, E(sparsity=0.5), gen([X(), X(3)]), options=bs.CalibOptions(bn_reestimate=True)),
         OK, lambda m, r: any("one-shot" in n for n in r.notes)),
    Case("sparsify_", "wrong config verb", lambda m: bs.sparsify_(m, bs.RTN(), [X()]),
         (ConfigError, "sparsify_ needs a sparsify config")),
    Case("sparsify_", "2:4 on 3 input channels, strict",
         lambda m: bs.sparsify_(m, E(pattern="2:4"), [X()], options=bs.CalibOptions(strict=True)),
         (ConfigError, r"layer 0: .*not divisible by the group size 4.*ignore=\['0'\]")),
    Case("sparsify_", "2:4 on 3 input channels: kept dense with a note",
         lambda m: bs.sparsify_(m, E(pattern="2:4"), [X()]),
         OK, lambda m, r: [row.name for row in r.rows] == ["3", "5"] and bool((m[0].weight != 0).all())
                     and sum("0 (8, 3, 3, 3) kept dense" in n for n in r.notes) == 1),
    Case("sparsify_", "ignore typo", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X()], ignore=["6"]),
         (ConfigError, "ignore pattern '6' matches no module.*candidates")),
    Case("sparsify_", "ignore as a string", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X()], ignore="5"),
         OK, lambda m, r: [row.name for row in r.rows] == ["0", "3"]),
    Case("sparsify_", "bad override regex",
         lambda m: bs.sparsify_(m, E(sparsity=0.5), [X()], overrides={"(": E(sparsity=0.1)}),
         (ConfigError, "overrides pattern '\\(' is not a valid regular expression")),
    Case("sparsify_", "override of another verb",
         lambda m: bs.sparsify_(m, E(sparsity=0.5), [X()], overrides={"0": bs.RTN()}),
         (ConfigError, "override '0': RTN is a quantize config")),
    Case("sparsify_", "options not CalibOptions", lambda m: bs.sparsify_(m, E(sparsity=0.5), [X()], options="dense"),
         (ConfigError, "options must be a CalibOptions")),
    Case("sparsify_", "model is not a module", lambda m: bs.sparsify_(None, E(sparsity=0.5), [X()]),
         (ConfigError, "needs an nn.Module")),
    Case("sparsify_", "meta-device model", lambda m: bs.sparsify_(m.to("meta"), E(sparsity=0.5), [X()]),
         (UnsupportedModuleError, "meta device.*Load the weights first"), model=lambda: nn.Linear(4, 4)),
    # ---------------------------------------------------------------- quantize_
    Case("quantize_", "wrong config verb", lambda m: bs.quantize_(m, E(sparsity=0.5), [X()]),
         (ConfigError, "quantize_ needs a quantize config")),
    Case("quantize_", "all-zero calibration", lambda m: bs.quantize_(m, bs.GPTQ(bits=4), [torch.zeros(2, 3, 8, 8)]),
         OK, lambda m, r: any("every one of its 27 inputs is zero" in n for n in r.notes)
                     and bool((m[0].weight != 0).any())),
    Case("quantize_", "bf16 model, fp32 calibration",
         lambda m: bs.quantize_(m.to(torch.bfloat16), bs.RTN(bits=4), [X()]),
         OK, lambda m, r: m[0].weight.dtype == torch.bfloat16 and any("bfloat16" in n for n in r.notes)),
    Case("quantize_", "fp16 model", lambda m: bs.quantize_(m.half(), bs.GPTQ(bits=4), [X()]), OK,
         lambda m, r: m[5].weight.dtype == torch.float16 and r.rows[-1].levels <= 16),
    Case("quantize_", "tied Linear weights", lambda m: bs.quantize_(m, bs.RTN(bits=4), [torch.randn(2, 4)]), OK,
         lambda m, r: m[0].weight is m[1].weight and len(r.rows) == 1 and "solved once" in " ".join(r.notes),
         model=lambda: _tied()),
    # ---------------------------------------------------------------- compress
    Case("compress", "recipe file missing", lambda m: bs.compress(m, "missing.yaml", [X()]),
         (ConfigError, "recipe file 'missing.yaml' not found")),
    Case("compress", "recipe is a number", lambda m: bs.compress(m, 3, [X()]),
         (ConfigError, "expected a YAML file path or YAML text")),
    Case("compress", "recipe YAML without method",
         lambda m: bs.compress(m, "brainsurgeon_recipe: 1\nsteps: [{ignore: [a]}]", [X()]),
         (ConfigError, "recipe step 0: must be a mapping with a 'method' key")),
    Case("compress", "recipe with a wrongly typed field",
         lambda m: bs.compress(m, "brainsurgeon_recipe: 1\nsteps: [{method: {type: GPTQ, blocksize: null}}]", [X()]),
         (ConfigError, "GPTQ.blocksize must be an integer")),
    Case("compress", "prune then strict 2:4 fails on conv 0 (rollback)",
         lambda m: bs.compress(m, bs.Recipe((bs.config.Step(bs.ChannelPruning(ratio=0.5)),
                                             bs.config.Step(E(pattern="2:4"))), bs.CalibOptions(strict=True)),
                               [X()]),
         (ConfigError, "not divisible by the group size 4")),
    Case("compress", "distill step without data",
         lambda m: bs.compress(m, bs.Recipe((bs.config.Step(bs.KD(epochs=1)),)), [X()]),
         (ConfigError, "needs training data; pass compress\\(model, recipe, calib, data=train_set\\)")),
    # ---------------------------------------------------------------- prune_
    Case("prune_", "wrong config", lambda m: bs.prune_(m, bs.RTN(), example_inputs=X()),
         (ConfigError, "prune_ needs a ChannelPruning config")),
    Case("prune_", "ignore typo (rollback identity)",
         lambda m: bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore=("9",)), example_inputs=X()),
         (ConfigError, "pattern '9' matches no module")),
    Case("prune_", "bad ignore regex",
         lambda m: bs.prune_(m, bs.ChannelPruning(ratio=0.5, ignore="["), example_inputs=X()),
         (ConfigError, "ChannelPruning.ignore pattern '\\[' is not a valid regular expression")),
    Case("prune_", "ratio as a string", lambda m: bs.prune_(m, bs.ChannelPruning(ratio="0.5"), example_inputs=X()),
         (ConfigError, "ratio .* must be in \\[0, 1\\)")),
    Case("prune_", "no example inputs", lambda m: bs.prune_(m, bs.ChannelPruning(ratio=0.5), example_inputs=None),
         (ConfigError, "example_inputs is required")),
    Case("prune_", "example inputs with the wrong channel count (rollback identity)",
         lambda m: bs.prune_(m, bs.ChannelPruning(ratio=0.5), example_inputs=X(c=1)),
         (CalibrationError, "forward failed on example_inputs \\[\\(2, 1, 8, 8\\) float32 cpu\\].*pass example_inputs "
                            "the model accepts")),
    Case("prune_", "example inputs in another dtype",
         lambda m: bs.prune_(m, bs.ChannelPruning(ratio=0.5), example_inputs=X(dtype=torch.float64)),
         (CalibrationError, "float64 cpu.*pass example_inputs the model accepts")),
    # ---------------------------------------------------------------- DependencyGraph
    Case("DependencyGraph", "model is a string", lambda m: bs.DependencyGraph("model", X()),
         (ConfigError, "model must be an nn.Module")),
    Case("DependencyGraph", "example inputs are a string", lambda m: bs.DependencyGraph(m, "x"),
         (CalibrationError, "example_inputs \\(no tensors: str\\)")),
    # ---------------------------------------------------------------- transform_
    Case("transform_", "calibration with the wrong channel count",
         lambda m: bs.transform_(m, bs.Separable(kind="spatial", ratio=0.5), [X(c=1)]),
         (CalibrationError, "transform_: the model's forward failed on the first calibration batch")),
    Case("transform_", "options not a CalibOptions",
         lambda m: bs.transform_(m, bs.Separable(kind="spatial", ratio=0.5), [X()], options="dense"),
         (ConfigError, "transform_: options must be a CalibOptions")),
    # ---------------------------------------------------------------- factorize_
    Case("factorize_", "wrong config",
         lambda m: bs.factorize_(m, bs.RTN()), (ConfigError, "factorize_ needs a LowRank config")),
    Case("factorize_", "activation-aware without calib",
         lambda m: bs.factorize_(m, bs.LowRank(rank=2, activation_aware=True)),
         (ConfigError, "needs calibration data"), model=lambda: _flat()),
    Case("factorize_", "activation-aware, wrong channels",
         lambda m: bs.factorize_(m, bs.LowRank(rank=2, activation_aware=True), [X(c=1)]),
         (CalibrationError, "factorize_: the model's forward failed.*192 input features"), model=lambda: _flat()),
    Case("factorize_", "rank as a string", lambda m: bs.factorize_(m, bs.LowRank(rank="2")), (ConfigError, "rank")),
    Case("factorize_", "hooked layer kept dense", lambda m: bs.factorize_(m, bs.LowRank(rank=2)), OK,
         lambda m, r: type(m[5]) is nn.Linear and any("hook(s) of yours" in n for n in r.notes)),
    # ---------------------------------------------------------------- share_
    Case("share_", "wrong config",
         lambda m: bs.share_(m, bs.RTN()), (ConfigError, "share_ needs a WeightSharing config")),
    Case("share_", "fine-tuning without data", lambda m: bs.share_(m, bs.WeightSharing(bits=2, finetune_steps=2)),
         (ConfigError, "needs data")),
    Case("share_", "fine-tuning data with wrong channels",
         lambda m: bs.share_(m, bs.WeightSharing(bits=2, finetune_steps=2), [(X(c=1), torch.zeros(2).long())]),
         (CalibrationError, "share_: the model's forward failed")),
    Case("share_", "bits out of range", lambda m: bs.share_(m, bs.WeightSharing(bits=0)), (ConfigError, "bits")),
    # ---------------------------------------------------------------- pack_
    Case("pack_", "wrong config", lambda m: pack_(m, bs.RTN()), (ConfigError, "pack_ needs a Pack config")),
    Case("pack_", "nothing to pack", lambda m: pack_(m, bs.Pack()), (ConfigError, "no nn.Linear"),
         model=lambda: nn.Sequential(nn.ReLU())),
    Case("pack_", "ignore typo", lambda m: pack_(m, bs.Pack(), ignore=["fc"]), (ConfigError, "matches no module")),
    # ---------------------------------------------------------------- search
    Case("search", "budget above dense", lambda m: search(m, SearchSpace(), "flops=2", [X()]),
         (ConfigError, "Budget.fraction: must be in \\(0, 1\\]")),
    Case("search", "unknown metric", lambda m: search(m, SearchSpace(), "speed=0.5", [X()]),
         (ConfigError, "Budget.metric: 'speed' is not one of")),
    Case("search", "space file missing", lambda m: search(m, "nospace.yaml", "flops=0.5", [X()]),
         (ConfigError, "search space file 'nospace.yaml' not found")),
    Case("search", "empty calibration", lambda m: search(m, SearchSpace(), "flops=0.5", []),
         (CalibrationError, "calibration data is empty")),
    # ---------------------------------------------------------------- save / load
    Case("save", "model is not a module",
         lambda m: save("model", "/tmp/never-written"), (FormatError, "writes an nn.Module")),
    Case("save", "target is a file",
         lambda m: save(m, __file__), (FormatError, "is a file; save\\(\\) writes a folder")),
    Case("load", "folder missing", lambda m: load("/nonexistent/ck", cnn), (FormatError, "not found; pass the folder")),
    Case("load", "folder is a number", lambda m: load(3, cnn), (FormatError, "must be the path of a checkpoint")),
]


def _flat() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 8)).eval()


def _tied() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    m[1].weight = m[0].weight
    return m


def _case(c: Any) -> Case:
    return c.values[0] if hasattr(c, "values") else c


@pytest.mark.parametrize("c", CASES, ids=[f"{_case(c).verb}: {_case(c).case}" for c in CASES])
def test_catalogue(c: Case):
    m = c.model()
    before = capture(m)
    if c.expect == OK:
        result = c.call(m)
        assert c.check is not None and c.check(m, result)
        return
    cls, text = c.expect
    with pytest.raises(cls, match=text):
        c.call(m)
    if c.case != "meta-device model":  # .to('meta') is the caller's own change, before the verb
        assert_untouched(m, before)


# ---------------------------------------------------------------- tampered, truncated and pickled checkpoints


def _ck(tmp_path) -> str:
    return save(cnn(), str(tmp_path / "ck"))


def _tamper_weights(ck: str) -> None:
    p = os.path.join(ck, "model.safetensors")
    data = bytearray(open(p, "rb").read())
    data[-5] ^= 0xFF
    open(p, "wb").write(bytes(data))


def _truncate(ck: str) -> None:
    p = os.path.join(ck, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _pickle_instead(ck: str) -> None:
    os.remove(os.path.join(ck, "model.safetensors"))
    os.remove(os.path.join(ck, "manifest.json"))
    with open(os.path.join(ck, "model.pt"), "wb") as f:
        pickle.dump({"a": 1}, f)


def _bad_manifest_json(ck: str) -> None:
    open(os.path.join(ck, "manifest.json"), "w").write("{not json")


CHECKPOINTS = {
    "tampered weights": (_tamper_weights, "does not match the SHA-256"),
    "truncated weights": (_truncate, "truncated"),
    "pickle instead of safetensors": (_pickle_instead, "is a pickle.*refuses it"),
    "manifest not JSON": (_bad_manifest_json, "is not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_damaged_checkpoints_are_format_errors(tmp_path, name):
    ck = _ck(tmp_path)
    damage, text = CHECKPOINTS[name]
    damage(ck)
    with pytest.raises(FormatError, match=text):
        load(ck, cnn)


def catalogue_counts() -> dict[str, int]:
    """Cases by expected outcome class (for the issue's note)."""
    out: dict[str, int] = {}
    for c in map(_case, CASES):
        k = "correct result" if c.expect == OK else c.expect[0].__name__
        out[k] = out.get(k, 0) + 1
    out["FormatError"] = out.get("FormatError", 0) + len(CHECKPOINTS)
    return out
