"""The checkpoint manifest: what `save` records beside the weights, and how `load` reads it back.

``manifest.json`` is plain JSON (never pickle)::

    {"brainsurgeon_checkpoint": 1, "versions": {...}, "model_class": "pkg.Net",
     "weights": {"file": "model.safetensors", "bytes": 1234, "sha256": "..."},
     "aliases": {"lm_head.weight": "embed.weight"},          # tied tensors, stored once
     "modules": {"fc1": {"format": "torch.Linear", "spec": {...}}},   # rebuilt where they differ
     "attrs": {"attn": {"num_heads": 2}},                      # scalar attributes of other modules
     "recipe": {...}, "plan": {...}, "history": [...], "hf_config": {...}}

    >>> m = read_manifest("out/ckpt")
    >>> m["recipe"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from typing import Any

from ..errors import FormatError

CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint (for bug reports; not enforced)."""
    import safetensors
    import torch

    from .. import __version__

    return {"brainsurgeon": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def to_json(x: Any, what: str) -> Any:
    """A JSON-safe copy of `x` (configs, recipes, reports and dataclasses via their dict forms).

    >>> to_json({"fc1": ExactOBS(sparsity=0.5)}, "plan")["fc1"]["type"]
    'ExactOBS'
    """
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return to_json(x.to_dict(), what)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_json(dataclasses.asdict(x), what)
    if isinstance(x, dict):
        return {str(k): to_json(v, what) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v, what) for v in x]
    raise FormatError(f"{what}: value {x!r} of type {type(x).__name__} cannot be stored as JSON; "
                      f"pass plain data (dict/list/str/number), a Config, a Recipe or a CompressionReport")


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str) -> dict[str, Any]:
    """The parsed, version-checked manifest of a checkpoint folder.

    >>> read_manifest("out/ckpt")["versions"]["torch"]
    '2.14.1'
    """
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FormatError(f"{path} not found; {folder!r} is not a brainsurgeon checkpoint. "
                          f"Write one with brainsurgeon.export.save(model, {folder!r})")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); the file is corrupted or truncated. "
                          f"Save the model again") from e
    if not isinstance(m, dict) or "brainsurgeon_checkpoint" not in m:
        raise FormatError(f"{path} has no 'brainsurgeon_checkpoint' key; it is not a brainsurgeon manifest. "
                          f"Save the model again with brainsurgeon.export.save")
    v = m["brainsurgeon_checkpoint"]
    if v != CHECKPOINT_VERSION:
        raise FormatError(f"{path}: checkpoint format version {v!r} is not supported (this brainsurgeon reads "
                          f"version {CHECKPOINT_VERSION}); load it with the brainsurgeon version that wrote it "
                          f"({m.get('versions', {}).get('brainsurgeon', 'unknown')}) and save again")
    for key, typ in (("weights", dict), ("aliases", dict), ("modules", dict), ("attrs", dict),
                     ("hf_keys", dict), ("shapes", dict)):
        if not isinstance(m.get(key, typ()), typ):
            raise FormatError(f"{path}: field {key!r} must be a JSON {typ.__name__}; the manifest is damaged, "
                              f"save the model again")
    return m


DIGEST = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest minus its own digest, over canonical JSON (sorted keys, no spaces).

    Covers everything load() acts on: module specs, attrs, aliases, the weights' size and hash.
    """
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    text = json.dumps(json.loads(json.dumps(body, allow_nan=True)), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_manifest_digest(folder: str, manifest: dict[str, Any]) -> None:
    """Refuse a manifest edited after save (``verify=True``); older manifests without a digest pass."""
    want = manifest.get(DIGEST)
    if want is None:
        return
    if want != manifest_digest(manifest):
        raise FormatError(f"{os.path.join(folder, MANIFEST)} was changed after save (its {DIGEST} does not match "
                          f"its content): module specs, attrs or aliases may not be what was saved. Save the model "
                          f"again, or pass verify=False to load it as it is")


def check_weights_file(folder: str, manifest: dict[str, Any], verify: bool) -> str:
    """Path of the weights file after size (truncation) and, if `verify`, manifest digest and SHA-256 checks."""
    if verify:
        check_manifest_digest(folder, manifest)
    w = manifest.get("weights", {})
    name = w.get("file", WEIGHTS)
    if not isinstance(name, str) or os.path.basename(name) != name:
        raise FormatError(f"manifest weights file {name!r} must be a plain file name inside the checkpoint; "
                          f"the manifest is damaged, save the model again")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FormatError(f"{path} not found; the checkpoint is incomplete. Copy the whole folder or save again")
    size = os.path.getsize(path)
    if "bytes" in w and size != w["bytes"]:
        raise FormatError(f"{path} is {size} bytes but the manifest records {w['bytes']}: the file is "
                          f"{'truncated' if size < w['bytes'] else 'longer than written'}. Copy it again or save again")
    if verify and "sha256" in w and sha256_file(path) != w["sha256"]:
        raise FormatError(f"{path} does not match the SHA-256 in the manifest: the file is corrupted. "
                          f"Copy it again or save the model again (verify=False skips this check)")
    return path
