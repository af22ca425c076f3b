"""Executors share the concurrent.futures interface; latency is measured, cached and honest."""

import importlib.util
import json

import pytest
import torch
from search_fixtures import TinyNet, calib, small_space
from torch import nn

from brainsurgeon.errors import BudgetInfeasibleError, ConfigError
from brainsurgeon.search import (
    Budget,
    InlineExecutor,
    LatencyTable,
    Variant,
    build_database,
    dp_plan,
    make_executor,
    time_module,
)
from brainsurgeon.search.latency import CSRLinear, machine_fingerprint, runtime_module


def test_inline_executor_returns_results_and_captures_errors():
    ex = make_executor("inline")
    assert isinstance(ex, InlineExecutor) and ex.submit(sum, [1, 2, 3]).result() == 6
    fut = ex.submit(int, "x")
    with pytest.raises(ValueError):
        fut.result()
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        make_executor("dask")


@pytest.mark.slow
def test_ray_executor_runs_a_task():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed here (optional extra: pip install 'brainsurgeon[ray]')")
    try:
        ex = make_executor("ray")
    except Exception as e:  # noqa: BLE001  (a sandbox may forbid Ray's local cluster)
        pytest.skip(f"Ray cannot start on this machine: {e}")
    try:
        assert ex.submit(pow, 2, 10).result() == 1024
    finally:
        ex.shutdown()


def test_csr_linear_matches_the_dense_layer_and_is_chosen_when_sparse():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    W = lin.weight.detach().clone()
    W[W.abs() < 0.1] = 0
    m, kernel = runtime_module(lin, W, Variant("sp", ()))
    x = torch.randn(5, 64)
    assert kernel == "csr" and isinstance(m, CSRLinear)
    assert torch.allclose(m(x), x @ W.t() + lin.bias, atol=1e-6)
    assert runtime_module(lin, lin.weight.detach(), Variant("dense", ()))[1] == "dense"


def test_time_module_restores_threads_and_table_caches_per_machine(tmp_path):
    torch.set_num_threads(2)
    lin = nn.Linear(32, 8)
    assert time_module(lin, torch.randn(1, 32), repeats=3) > 0
    assert torch.get_num_threads() == 2
    table = LatencyTable(tmp_path)
    a = table.measure("fc|dense", lin, lin.weight.detach(), Variant("dense", ()), (1, 32), repeats=3)
    b = LatencyTable(tmp_path).measure("fc|dense", nn.Linear(32, 8), lin.weight, Variant("dense", ()), (1, 32))
    assert a == b  # read back from latency-<fingerprint>.json, not re-timed
    data = json.loads((tmp_path / f"latency-{machine_fingerprint()}.json").read_text())
    assert data["rows"]["fc|dense"]["kernel"] == "dense"


def test_latency_database_and_latency_budget(tmp_path):
    table = build_database(TinyNet(), small_space(levels=2, nm=(), block_sparsities=(), nm_bits=(), latency=True,
                                                  model_loss=False), calib(), tmp_path)
    assert all(e.costs["latency"] > 0 for es in table.entries.values() for e in es)
    rows = json.loads(next(tmp_path.glob("latency-*.json")).read_text())["rows"]
    assert {r["kernel"] for r in rows.values()} <= {"dense", "csr"} and len(rows) == 3 * 4
    try:
        plan = dp_plan(table, Budget("latency", 1.0))
        assert plan.info["cost"] <= 1.0 + 1e-9
    except BudgetInfeasibleError as e:  # every variant slower than dense is a legitimate outcome
        assert "cheapest reachable latency" in str(e)
