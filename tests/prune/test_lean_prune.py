"""`import brainsurgeon.prune` (and its CLI module) does no work: no transformers, torchvision or CUDA."""

import subprocess
import sys

CODE = """
import sys, torch
flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
import brainsurgeon.prune, brainsurgeon.cli.prune
for heavy in ("transformers", "torchvision", "torch_pruning", "matplotlib"):
    assert heavy not in sys.modules, heavy + " imported"
assert not torch.cuda.is_initialized(), "CUDA initialised"
assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
print("lean")
"""


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lean"
