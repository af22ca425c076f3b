"""One-way dependencies among the modules this issue touched (13: the import circles)."""

import ast
import os

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src", "brainsurgeon")


def _imports(rel: str) -> set[str]:
    """Relative module names `rel` imports anywhere (also inside functions), e.g. {'.hf_build'}."""
    tree = ast.parse(open(os.path.join(SRC, rel), encoding="utf-8").read())
    return {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}


def test_checkpoint_does_not_import_hf():
    assert ".hf" not in _imports("export/checkpoint.py")
    assert ".hf" not in _imports("export/hf_build.py") and ".checkpoint" not in _imports("export/hf_build.py")
    assert ".checkpoint" not in _imports("export/folder.py")


BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def _bench_imports(name: str) -> set[str]:
    tree = ast.parse(open(os.path.join(BENCH, name), encoding="utf-8").read())
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
    return out


def test_bench_toolbox_parts_do_not_import_toolbox():
    assert "toolbox" not in _bench_imports("distill_qat.py") and "toolbox" not in _bench_imports("lowrank_share.py")
    assert "toolbox" not in _bench_imports("_runner.py")
    assert {"distill_qat", "lowrank_share", "_runner"} <= _bench_imports("toolbox.py")
