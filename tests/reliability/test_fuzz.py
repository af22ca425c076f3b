"""Property: no public entry point lets a non-brainsurgeon exception escape for bad input (seeded fuzz).

Every registered config gets random wrong values in each field; every verb gets random wrong
arguments. The only acceptable outcomes are success or a brainsurgeon.errors class; on failure
the model is untouched (bit- and object-identical).
"""

import dataclasses
import math
import random

import pytest
import torch
from reliability_state import assert_untouched, capture
from torch import nn

import brainsurgeon as bs
from brainsurgeon.config import _REGISTRY
from brainsurgeon.errors import BrainsurgeonError

WRONG = [None, "", "x", "0.5", -1, 0, 1, 3, 2**40, -0.5, 0.5, 1.5, math.nan, math.inf, -math.inf, True, False,
         [], [1], ["a"], {}, {"a": 1}, (), ("a", 1), object(), b"1", 1e-300]


def _import_all():
    import brainsurgeon.distill  # noqa: F401
    import brainsurgeon.lowrank  # noqa: F401
    import brainsurgeon.prune  # noqa: F401
    import brainsurgeon.quant  # noqa: F401
    import brainsurgeon.search  # noqa: F401
    import brainsurgeon.share  # noqa: F401


_import_all()
CONFIGS = sorted(_REGISTRY)
FOUND: dict[str, list[str]] = {}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_field_accepts_or_refuses_with_a_config_error(name):
    cls = _REGISTRY[name]
    base = {"ExactOBS": {"sparsity": 0.5}, "SparseGPT": {"sparsity": 0.5}, "Magnitude": {"sparsity": 0.5},
            "ChannelPruning": {"ratio": 0.5}}.get(name, {})
    for f in dataclasses.fields(cls):
        for v in WRONG:
            try:
                cls(**{**base, f.name: v})
            except BrainsurgeonError:
                continue
            except Exception as e:  # noqa: BLE001 - the property under test
                pytest.fail(f"{name}({f.name}={v!r}) raised {type(e).__name__}: {e}")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def good_calib():
    return [torch.randn(4, 8) for _ in range(2)]


CALIBS = [None, [], [[]], [torch.randn(4, 3)], [torch.randn(4, 8, 2)], [torch.full((4, 8), math.nan)],
          [torch.randint(0, 3, (4, 8))], [{"x": torch.randn(4, 8)}], ["text"], 3, torch.randn(4, 8),
          iter([]), (x for x in [torch.randn(4, 8)]), lambda: [torch.randn(4, 8)], [torch.randn(0, 8)],
          [torch.randn(4, 8, dtype=torch.float64)], [(torch.randn(4, 8), 1)], [torch.randn(4, 8).to(torch.float16)]]
IGNORES = [None, "", "0", ["0"], ["9"], ["[", "0"], [3], 3, {"0": 1}, ("0", "2"), [".*"]]
OVERRIDES = [None, {}, {"0": bs.RTN(bits=8)}, {"(": bs.RTN(bits=8)}, [("0",)], [(3, bs.RTN())], "0", 3,
             {"0": 3}, {"0": bs.ExactOBS(sparsity=0.5)}]
OPTIONS = [None, bs.CalibOptions(), bs.CalibOptions(mode="dense"), bs.CalibOptions(blocks="nope"), 3, "dense",
           bs.CalibOptions(max_batches=1, bn_reestimate=True, correct_mean_std=True)]


def _verbs():
    return {
        "sparsify_": lambda m, c, i, o, p: bs.sparsify_(m, bs.ExactOBS(sparsity=0.5), c, ignore=i, overrides=o,
                                                         options=p),
        "quantize_": lambda m, c, i, o, p: bs.quantize_(m, bs.GPTQ(bits=4), c, ignore=i, overrides=o, options=p),
        "factorize_": lambda m, c, i, o, p: bs.factorize_(m, bs.LowRank(rank=2, activation_aware=True), c,
                                                          ignore=i, options=p),
        "share_": lambda m, c, i, o, p: bs.share_(m, bs.WeightSharing(bits=2), c, ignore=i),
        "compress": lambda m, c, i, o, p: bs.compress(m, bs.Recipe((bs.config.Step(bs.RTN(bits=4), i),)), c),
    }


def _short(x):
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}:{x.dtype}"
    if isinstance(x, list | tuple):
        return type(x).__name__ + "[" + ", ".join(_short(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in x.items()) + "}"
    return repr(x)[:60]


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_verbs_accept_only_brainsurgeon_errors_for_bad_arguments(verb):
    rng = random.Random(13)
    fn = _verbs()[verb]
    raw = []
    for _ in range(40):
        m = mlp()
        before = capture(m)
        args = (rng.choice(CALIBS + [good_calib()] * 4), rng.choice(IGNORES + [()] * 4),
                rng.choice(OVERRIDES + [()] * 4), rng.choice(OPTIONS + [None] * 4))
        calib = args[0]
        if hasattr(calib, "__next__"):  # one-shot iterators are drawn fresh each time
            calib = iter(list(calib))
        try:
            fn(m, calib, *args[1:])
        except BrainsurgeonError:
            assert_untouched(m, before)
        except Exception as e:  # noqa: BLE001 - the property under test
            raw.append(f"{verb}({', '.join(_short(a) for a in args)}): {type(e).__name__}: {str(e)[:200]}")
    assert raw == [], "\n".join(raw)
