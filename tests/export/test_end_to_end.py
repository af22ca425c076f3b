"""One path through everything: compress with the API, measure, plot, write HTML, save, reload, same outputs."""

from __future__ import annotations

import re

import pytest
import torch
from export_fixtures import digits

import brainsurgeon as bs
from brainsurgeon.export import load, read_manifest, save
from brainsurgeon.models import build_model
from brainsurgeon.report import CompressionReport


def test_compress_report_save_load(tmp_path):
    pytest.importorskip("matplotlib")
    model = digits()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(32, 1, 8, 8, generator=g) for _ in range(2)]
    x = torch.randn(16, 1, 8, 8, generator=g)
    step = bs.Step(bs.Magnitude(sparsity=0.5), ignore=("conv1",))
    rep = bs.compress(model, bs.Recipe(steps=(step,)), calib)
    rep.measure(model, x[:1])
    rep.add_metric("latency_ms_b1", before=1.0, after=0.8)
    assert {r.name: r.macs for r in rep.rows}["fc1"] == 512 * 64
    assert all(r.bytes > 0 for r in rep.final_rows())

    html = rep.to_html(str(tmp_path / "report.html"))
    text = open(html, encoding="utf-8").read()
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 2  # layers + latency; one point: no Pareto
    with torch.no_grad():
        ref = model.eval()(x)
    save(model, str(tmp_path / "ck"), recipe=bs.Recipe(steps=(step,)), history=rep)
    man = read_manifest(str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), lambda: build_model("digits-cnn")).eval()
    with torch.no_grad():
        assert torch.equal(again(x), ref)
    back = CompressionReport.from_dict(man["history"])
    assert back.to_table() == rep.to_table()
    assert float((again.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
