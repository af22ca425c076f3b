"""The zoo sweep's fast subset through the benchmark's own per-model code path (bench/graph_zoo.py):
``bs.prune_`` exactly as a user calls it on hand-written, HF (tiny configs) and timm models; each must lose
at least 25 % of its parameters, run in eval and train mode with the same output shapes, and (HF) reload
with identical outputs. The whole sweep (every timm family, every HF family) is ``@pytest.mark.slow``;
its table is ``python bench/graph_zoo.py``.
"""

from __future__ import annotations

import sys

import pytest
from bench_module import BENCH, bench_module

HAND = ["hand:unet", "hand:chunk_split", "hand:einsum_sdpa", "hand:gat", "hand:lstm_lm_tied", "hand:pointnet",
        "hand:dwsep_conv1d"]
HF = ["hf:bert", "hf:gpt2", "hf:llama", "hf:gemma", "hf:resnet"]
TIMM = ["timm:resnet:test_resnet", "timm:convnext:convnext_atto", "timm:mobilenetv3:mobilenetv3_small_050"]
TV = ["tv:resnet18", "tv:mobilenet_v3_small"]


@pytest.fixture(scope="module")
def zoo():
    with bench_module("graph_zoo.py") as mod:
        yield mod


def _needs(name: str) -> None:
    if name.startswith("hf:"):
        pytest.importorskip("transformers")
    if name.startswith("timm:"):
        pytest.importorskip("timm")


@pytest.mark.parametrize("name", HAND + HF + TIMM + TV)
def test_zoo_model_prunes_a_quarter_and_runs(zoo, name):
    import torch
    _needs(name)
    torch.manual_seed(0)
    res = zoo.run(name, "ours")
    assert res["ok"], res.get("error")
    assert res["drop"] >= 0.25
    if name.startswith("hf:"):
        assert res["roundtrip"] == "exact"


def _all() -> list[str]:
    sys.path.insert(0, str(BENCH))
    try:
        import _zoo_models
        return _zoo_models.all_names()
    except ImportError:
        return []
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
@pytest.mark.parametrize("name", _all())
def test_zoo_sweep(zoo, name):
    test_zoo_model_prunes_a_quarter_and_runs(zoo, name)
