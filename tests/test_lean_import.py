"""`import brainsurgeon` does no work: no transformers/torchvision/matplotlib/onnx, no CUDA init, no torch flags."""

import subprocess
import sys

CODE = """
import sys, torch
flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
import brainsurgeon, brainsurgeon.api, brainsurgeon.obs, brainsurgeon.calib
heavy = [m for m in ("transformers", "torchvision", "matplotlib", "onnx", "onnxruntime", "ray", "torch_pruning",
                     "sklearn", "scipy") if m in sys.modules]
assert not heavy, f"imported at import time: {heavy}"
assert not torch.cuda.is_initialized(), "CUDA initialised"
assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
print("lean")
"""


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lean"
