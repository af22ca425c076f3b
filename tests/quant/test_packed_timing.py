"""Timing helper and MAC counting: exact MACs, restored threads/modes, sane statistics."""

import pytest
import torch
from torch import nn

from brainsurgeon.quant import Pack, SparseLinear, count_macs, pack_
from brainsurgeon.quant.measure import Timing, compare_latency, format_speed_table, time_call, time_model


def test_count_macs_is_exact_for_linear_conv_packed_and_sparse():
    assert count_macs(nn.Linear(10, 4), torch.randn(3, 10)) == 3 * 10 * 4
    assert count_macs(nn.Linear(10, 4), torch.randn(2, 5, 10)) == 10 * 10 * 4
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    assert count_macs(conv, torch.randn(2, 4, 6, 6)) == 2 * 8 * 36 * (2 * 9)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    dense = count_macs(model, torch.randn(5, 64))
    pack_(model, Pack(bits=4, group_size=32, rtn=True))
    assert count_macs(model, torch.randn(5, 64)) == dense  # packing changes bytes, not MACs
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[:, 16:] = 0
    assert count_macs(SparseLinear.from_linear(lin, "csr"), torch.randn(5, 64)) == 5 * 16 * 32


def test_time_call_restores_threads_and_reports_median_and_iqr():
    prev = torch.get_num_threads()
    a = torch.randn(64, 64)
    t = time_call(lambda: a @ a, threads=1, warmup=1, min_run_time=0.05)
    assert torch.get_num_threads() == prev
    assert t.threads == 1 and t.runs == len(t.times) >= 1
    assert min(t.times) <= t.median_s <= max(t.times) and t.iqr_s >= 0
    assert t.median_ms == pytest.approx(1e3 * t.median_s)


def test_timing_statistics():
    t = Timing.of([1.0, 2.0, 3.0, 4.0, 100.0], threads=1)
    assert t.median_s == 3.0 and t.iqr_s == pytest.approx(2.0)  # quartiles 2 and 4: robust to the outlier


def test_time_model_restores_training_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    time_model(model, torch.randn(2, 8), min_run_time=0.02, warmup=1)
    assert model.training and model[1].training


def test_compare_latency_rows_and_table():
    dense = nn.Sequential(nn.Linear(32, 32))
    half = nn.Sequential(SparseLinear.from_linear(_half_pruned(), "csr"))
    rows = compare_latency({"dense": dense, "csr": half}, {1: torch.randn(1, 32), 4: torch.randn(4, 32)},
                           min_run_time=0.04, rounds=2)
    assert [(r.variant, r.batch) for r in rows] == [("dense", 1), ("csr", 1), ("dense", 4), ("csr", 4)]
    assert rows[0].speedup == 1.0 and rows[0].mac_ratio == 1.0
    assert rows[1].mac_ratio == pytest.approx(2.0)
    assert rows[1].efficiency == pytest.approx(rows[1].speedup / 2.0)
    table = format_speed_table(rows)
    assert table.splitlines()[0].split()[:3] == ["variant", "batch", "median"] and len(table.splitlines()) == 6


def _half_pruned() -> nn.Linear:
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    return lin


def test_cpu_clock_times_the_process_and_refuses_multithreaded_use():
    from brainsurgeon.errors import ConfigError

    a = torch.randn(64, 64)
    t = time_call(lambda: a @ a, threads=1, warmup=1, min_run_time=0.05, clock="cpu")
    assert t.clock == "cpu" and t.median_s > 0
    with pytest.raises(ConfigError, match=r"clock='cpu'.*only with threads=1.*clock='wall'"):
        time_call(lambda: a @ a, threads=2, clock="cpu")
    with pytest.raises(ConfigError, match=r"clock='gpu'; allowed"):
        time_call(lambda: a @ a, clock="gpu")
