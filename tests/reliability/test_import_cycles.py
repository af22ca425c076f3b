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
