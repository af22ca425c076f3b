"""Report plots and the self-contained HTML page: valid PNGs, Pareto front, no network, a headless render."""

from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from brainsurgeon.plots import pareto_front
from brainsurgeon.report import CompressionReport, LayerRow
from brainsurgeon.report_html import render_html

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def _rep(points: int = 4, latency: bool = True) -> CompressionReport:
    rep = CompressionReport()
    for i in range(6):
        rep.add_row(LayerRow(f"layer{i}", "ExactOBS", (16, 16), 256, 256 - 40 * i, 32.0 if i % 2 else 4.0,
                             0.1, 0.01, 0.1, rank=4 * i))
    rep.add_metric("accuracy", before=0.98, after=0.975)
    if latency:
        rep.add_metric("latency_ms_b1", before=2.0, after=1.25)
        rep.add_metric("latency_ms_b32", before=20.0, after=11.0)
    for i, (c, q) in enumerate([(1.0, 0.98), (0.5, 0.975), (0.6, 0.96), (0.25, 0.95), (0.3, 0.97)][:points]):
        rep.add_point(f"run{i}", cost=c, quality=q, cost_name="bytes / dense")
    rep.notes.append("timings <taken> on a loaded machine & shared cores")
    return rep


def test_pareto_front_matches_brute_force():
    vals = [0.1, 0.5, 0.9]
    for cs, qs in itertools.product(itertools.product(vals, repeat=3), itertools.product(vals, repeat=3)):
        pts = [{"cost": c, "quality": q} for c, q in zip(cs, qs, strict=True)]
        brute = {i for i, a in enumerate(pts)
                 if not any((b["cost"] <= a["cost"] and b["quality"] >= a["quality"]) and b != a for b in pts)}
        assert set(pareto_front(pts)) == brute
    assert pareto_front([{"cost": 3, "quality": 0.9}, {"cost": 1, "quality": 0.5}]) == [1, 0]  # sorted by cost


def test_plot_writes_the_applicable_pngs(tmp_path):
    paths = _rep().plot(str(tmp_path / "p"))
    assert [os.path.basename(p) for p in paths] == ["layers.png", "pareto.png", "latency.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert data.startswith(PNG) and len(data) > 5000
    only_layers = _rep(points=1, latency=False).plot(str(tmp_path / "q"))
    assert [os.path.basename(p) for p in only_layers] == ["layers.png"]
    assert CompressionReport().plot(str(tmp_path / "empty")) == []
    assert sorted(os.listdir(tmp_path / "p")) == ["latency.png", "layers.png", "pareto.png"]  # no temp files left


def test_html_is_self_contained(tmp_path):
    rep = _rep()
    path = rep.to_html(str(tmp_path / "r.html"))
    text = open(path, encoding="utf-8").read()
    imgs = re.findall(r'<img alt="(\w+) plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [n for n, _ in imgs] == ["layers", "pareto", "latency"]
    assert all(base64.b64decode(d).startswith(PNG) for _, d in imgs)
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "http" not in text.replace(
        "data:image", "")  # nothing fetched from anywhere
    assert "&lt;taken&gt; on a loaded machine &amp; shared cores" in text  # escaped
    assert text.count("<tr>") == 1 + 1 + 1 + 3 + 1 + 4 + 1 + 6  # summary, metrics, runs, layers (with headers)
    assert text == render_html(rep)  # deterministic
    assert os.listdir(tmp_path) == ["r.html"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless browser: apt-get install chromium to run this check")
def test_html_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    html_path = _rep().to_html(str(tmp_path / "r.html"))
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2600",
           f"file://{html_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2600)
    px = np.asarray(img).astype(int)

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(px - np.array(rgb)).max(axis=-1) < 12).sum())

    blue, red = count((31, 119, 180)), count((214, 39, 40))  # matplotlib tab:blue bars, tab:red front
    assert blue > 2000 and red > 200  # the embedded bar chart and the Pareto front were drawn


def test_units_a_person_reads():
    from brainsurgeon.report_html import human_bytes, human_count, metric_cells

    assert human_bytes(195017) == "190 KB" and human_bytes(33587) == "32.8 KB" and human_bytes(512) == "512 B"
    assert human_bytes(3.5 * 1024**2) == "3.50 MB" and human_bytes(-162000) == "-158 KB"
    assert human_count(476_000) == "476 k" and human_count(1.23e9) == "1.23 G" and human_count(640) == "640"
    assert metric_cells("bytes_on_disk", 195017.0, 33587.0) == ["190 KB", "32.8 KB", "-158 KB (0.172x)"]
    assert metric_cells("accuracy", 0.99444, 0.99167) == ["99.44 %", "99.17 %", "-0.28 pt"]


def test_measured_cells_are_filled_and_ties_are_separated():
    """Bytes/MACs show in human units once measured; runs carry interval, agreement and KL columns."""
    rep = _rep(points=0, latency=False)
    for r in rep.rows:
        r.bytes, r.macs = 195017, 1_230_000
    rep.add_point("RTN", cost=0.17, quality=0.9944, ci_low=0.98, ci_high=0.998, agreement=0.9972, kl=7.0e-4)
    rep.add_point("OBQ", cost=0.17, quality=0.9944, ci_low=0.98, ci_high=0.998, agreement=1.0, kl=8.3e-5)
    text = render_html(rep)
    summary = text.split("<h2>Summary</h2>")[1].split("</table>")[0]
    assert "1.12 MB" in summary and "7.38 M" in summary and ">-<" not in summary
    runs = text.split("<h2>Runs</h2>")[1].split("</table>")[0]
    assert "98.0 - 99.8 %" in runs and "99.72 %" in runs and "7.00e-04" in runs and "8.30e-05" in runs
    assert ".0000<" not in text  # no four-decimal byte counts


def test_pareto_labels_do_not_overlap():
    """Runs at one point share a label; labels of nearby points are moved until no two boxes overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from brainsurgeon.plots import pareto_figure

    pts = [{"label": n, "cost": c, "quality": q, "cost_name": "bytes / dense", "quality_name": "accuracy"}
           for n, c, q in [("dense", 1.0, 0.9944), ("RTN 4-bit", 0.172, 0.9944), ("OBQ 4-bit", 0.172, 0.9944),
                           ("ExactOBS 75% unstructured + OBQ 4-bit", 0.172, 0.9917), ("Magnitude", 0.51, 0.919),
                           ("ExactOBS 75% unstructured", 0.509, 0.9944), ("ChannelPruning 50%", 0.271, 0.9889)]]
    fig = pareto_figure(pts)
    FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in texts) == sorted(["dense", "RTN 4-bit / OBQ 4-bit", "Magnitude",
                                                          "ExactOBS 75% unstructured + OBQ 4-bit",
                                                          "ExactOBS 75% unstructured", "ChannelPruning 50%"])
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
