"""CompressionReport: table columns, totals, JSON round trip, backward compatibility, measured bytes/MACs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from brainsurgeon.report import CompressionReport, LayerRow


def _rep() -> CompressionReport:
    rep = CompressionReport()
    rep.add_row(LayerRow("conv1", "ExactOBS 50% unstructured", (8, 1, 3, 3), 72, 36, 32.0, 0.5, 0.01, 0.2))
    rep.add_row(LayerRow("fc1", "ExactOBS 75% unstructured", (64, 128), 8192, 2048, 32.0, 0.1, 0.02, 0.3))
    rep.add_row(LayerRow("fc1", "OBQ 4-bit", (64, 128), 8192, 2048, 4.0, 0.2, 0.03, 0.4, levels=16))
    return rep


def test_old_positional_rows_still_work_and_new_fields_default_to_zero():
    r = LayerRow("fc", "m", (2, 2), 4, 2, 32.0, 0.0, 0.0, 0.1, 1, 0, 0)
    assert (r.rank, r.bytes, r.macs) == (0, 0, 0) and r.sparsity == 0.5


def test_totals_use_the_last_row_per_layer():
    t = _rep().totals()
    assert t["params"] == 72 + 8192 and t["nonzeros"] == 36 + 2048
    assert t["avg_bits"] == pytest.approx((36 * 32 + 2048 * 4) / (36 + 2048))
    assert t["seconds"] == pytest.approx(0.9) and t["bytes"] == 0 and t["macs"] == 0


def test_table_shows_rank_bytes_macs_only_when_measured():
    rep = _rep()
    head = rep.to_table().splitlines()[0].split()
    assert head == ["layer", "method", "params", "sparsity", "bits", "loss", "rel.err", "sec", "retry"]
    rep.add_row(LayerRow("fc2", "LowRank 64->8", (10, 64), 592, 592, 32.0, 0.0, 0.0, 0.1, rank=8, bytes=2368,
                         macs=592))
    lines = rep.to_table().splitlines()
    assert lines[0].split() == ["layer", "method", "params", "sparsity", "bits", "rank", "bytes", "MACs", "loss",
                                "rel.err", "sec", "retry"]
    fc2 = next(line for line in lines if line.startswith("fc2"))
    assert fc2.split()[6:9] == ["8", "2.37k", "592"]
    total = next(line for line in lines if line.startswith("total"))
    assert "2.37k" in total and all(len(line) == len(lines[0]) for line in lines[1:6])


def test_json_round_trip_and_old_json_without_new_keys():
    rep = _rep()
    rep.add_metric("accuracy", before=0.98, after=0.97)
    rep.add_point("a", cost=0.5, quality=0.97)
    rep.notes.append("bn re-estimated")
    back = CompressionReport.from_dict(json.loads(rep.to_json()))
    assert back.to_dict() == rep.to_dict() and back.rows[0].shape == (8, 1, 3, 3)
    old = json.loads(rep.to_json())
    del old["points"]
    for r in old["rows"]:
        del r["rank"], r["bytes"], r["macs"]
    assert CompressionReport.from_dict(old).rows == rep.rows


def test_save_is_atomic_json(tmp_path):
    rep = _rep()
    rep.save(str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["layers"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_extend_merges_points():
    a, b = _rep(), CompressionReport()
    b.add_point("x", 1.0, 0.9)
    a.extend(b)
    assert a.points == [{"label": "x", "cost": 1.0, "quality": 0.9, "cost_name": "relative cost",
                         "quality_name": "accuracy"}]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, groups=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.low = nn.Sequential(nn.Linear(10, 2, bias=False), nn.Linear(2, 5))  # a factorized layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(self.fc(self.conv(x).flatten(1)))


def test_measure_counts_bytes_and_macs_per_sample():
    net = _Net().train()
    rep = CompressionReport()
    for n in ("conv", "fc", "low"):
        rep.add_row(LayerRow(n, "m", (1,), 1, 1, 32.0, 0.0, 0.0, 0.0))
    rep.measure(net, torch.zeros(3, 1, 8, 8))
    b = {r.name: r.bytes for r in rep.rows}
    m = {r.name: r.macs for r in rep.rows}
    assert b == {"conv": (36 + 4) * 4, "fc": (256 * 10 + 10) * 4, "low": (20 + 10 + 5) * 4}
    assert m == {"conv": 4 * 64 * 9, "fc": 256 * 10, "low": 10 * 2 + 2 * 5}
    assert net.training  # mode restored
    assert all(not m._forward_hooks for m in net.modules())  # hooks removed
