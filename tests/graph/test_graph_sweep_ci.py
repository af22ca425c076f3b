"""torchvision structural-pruning sweep through the benchmark's own per-model code path (bench/graph_coverage.py).

The default suite prunes a handful of families (ResNet, MobileNetV3, EfficientNet, DenseNet, ShuffleNet,
GoogLeNet with aux heads in train mode, ViT, a Faster R-CNN built with ``weights_backbone=None``):
50 % of every group by L2, final prediction layers ignored, verified. The full sweep (every model of
``torchvision.models.list_models()``) is ``@pytest.mark.slow`` (``make test-slow``); its table is
``python bench/graph_coverage.py --full``.
"""

from __future__ import annotations

import pytest
from bench_module import bench_module

pytest.importorskip("torchvision")

CI_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x0_5", "googlenet",
             "vit_b_32", "fasterrcnn_mobilenet_v3_large_320_fpn"]


@pytest.fixture(scope="module")
def bench():
    """bench/graph_coverage.py as a module (run_ours: build, prune 50 % by L2, verify, count), on 1 thread."""
    with bench_module("graph_coverage.py") as mod:
        yield mod


def _check(res: dict, name: str, bench) -> None:
    if bench.family(name) != "detection":   # detection models need targets in train mode
        assert res["train_before"], "the unpruned model does not run in train mode on the bench input"
    assert res["train_ok"], "train-mode forward fails after pruning"
    assert res["shape_ok"], "output shapes changed"
    (p0, p1), (m0, m1) = res["params"], res["macs"]
    assert p1 < 0.75 * p0 and m1 < 0.75 * m0, f"params {p0}->{p1}, MACs {m0}->{m1}"


@pytest.mark.parametrize("name", CI_MODELS)
def test_ci_model_prunes_half_verified(bench, name):
    import torch
    torch.manual_seed(0)
    res = bench.run_ours(name)
    assert res["groups"] > 0 and res["failed_groups"] < res["groups"]
    _check(res, name, bench)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(__import__("torchvision").models.list_models())))
def test_full_sweep_model_prunes_verified(bench, name):
    """Every torchvision model, as in ``bench/graph_coverage.py --full`` (ours; one model per test)."""
    res = bench.one(name, "ours")
    assert res["ok"], res.get("error")
    _check(res, name, bench)
