"""Hugging Face round trip: `save_pretrained` / `from_pretrained` for pruned or quantized transformers.

HF's own ``save_pretrained`` writes ``config.json`` + ``model.safetensors``; we add our
``manifest.json`` (the override file): per-module specs for widths the HF config cannot express
(one MLP narrowed more than another, pruned heads), registered compressed formats, scalar
attributes such as ``head_dim``, and tied-weight aliases. A model whose shapes still match its
config (sparsified, fake-quantized) also reloads with plain ``AutoModel.from_pretrained``::

    >>> save_pretrained(model, "out/tiny-llama")
    >>> model = from_pretrained("out/tiny-llama")       # applies the overrides, identical outputs
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

from torch import nn

from .._log import get_logger
from ..errors import FormatError
from .checkpoint import build_manifest, find_aliases, load, write_manifest
from .folder import check_target, commit_folder, temp_folder
from .hf_build import _transformers, build_hf_model, shrink_to_saved  # noqa: F401 - re-exported
from .manifest import MANIFEST, WEIGHTS

log = get_logger(__name__)


def save_pretrained(model: nn.Module, folder: str, recipe: Any = None, plan: Any = None,
                    history: Any = None) -> str:
    """HF ``model.save_pretrained`` plus brainsurgeon's ``manifest.json`` overrides, written atomically.

    >>> save_pretrained(pruned_bert, "out/bert-pruned")
    'out/bert-pruned'
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise FormatError(f"{type(model).__name__} has no save_pretrained (not an HF PreTrainedModel); "
                          f"use brainsurgeon.export.save instead")

    check_target(folder)
    aliases = find_aliases(model)
    manifest = build_manifest(model, aliases, recipe, plan, history)
    tmp = temp_folder(folder)
    try:
        names = _saved_names(model)
        kw = {}
        if len(names) < len(model.state_dict()):  # a converter rebuilds tensors on save (Mixtral's fused experts)
            log.info("%s: transformers converts some tensors on save; writing them under their state_dict names "
                     "(save_original_format=False, which transformers >= 5 loads as they are)", type(model).__name__)
            names, kw = {k: k for k in model.state_dict()}, {"save_original_format": False}
        with _no_hf_progress():
            model.save_pretrained(tmp, max_shard_size="10000GB", **kw)
        if not os.path.isfile(os.path.join(tmp, WEIGHTS)):
            raise FormatError(f"save_pretrained did not write a single {WEIGHTS} in {folder} "
                              f"(wrote {sorted(os.listdir(tmp))}); sharded checkpoints are not supported yet")
        _check_keys(model, os.path.join(tmp, WEIGHTS), manifest, names)
        write_manifest(tmp, manifest)
        commit_folder(tmp, os.path.abspath(folder))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@contextlib.contextmanager
def _no_hf_progress() -> Iterator[None]:
    """Silence transformers' own progress bars (the library never prints); restored afterwards."""
    hf_logging = _transformers().utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _saved_names(model: nn.Module) -> dict[str, str]:
    """state_dict name -> the name ``save_pretrained`` writes it under.

    transformers >= 5 saves in the checkpoints' original layout: its weight-conversion mapping (renamings such
    as ViT's ``layers.0.attention.q_proj`` -> ``encoder.layer.0.attention.attention.query``), reversed by
    ``revert_weight_conversion``; its ``from_pretrained`` applies the mapping forward. A pure renaming hands
    the same tensor objects back, so names are matched by identity; a tensor a converter rebuilt (fused
    experts, transposes) has no entry here, and :func:`save_pretrained` then writes state_dict names.
    """
    sd = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 writes state_dict names as they are
        return {k: k for k in sd}
    owner = {id(t): k for k, t in sd.items()}
    names = {}
    for saved, t in revert_weight_conversion(model, dict(sd)).items():
        k = owner.get(id(t))
        if k is not None:
            names[k] = saved
    return names


def _check_keys(model: nn.Module, path: str, manifest: dict[str, Any], names: dict[str, str]) -> None:
    """Every state_dict tensor is in the file (under its saved name) or is a tie to one that is (HF drops
    tied copies). Records the renamings in the manifest (``hf_keys``: saved name -> state_dict name) so
    :func:`from_pretrained` maps them back as transformers' own loader does."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    aliases = manifest["aliases"]
    for k in model.state_dict():
        if names.get(k) in keys:
            aliases.pop(k, None)  # HF kept both copies: nothing to re-tie from the file's point of view
        elif k not in aliases or names.get(aliases[k]) not in keys:
            raise FormatError(f"save_pretrained wrote {path} without tensor {k!r} (saved name "
                              f"{names.get(k)!r}) and it is not tied to a saved one: this transformers version "
                              f"converts it on save (not a plain renaming); use brainsurgeon.export.save")
    renamed = {s: k for k, s in names.items() if s != k and s in keys}
    if renamed:
        manifest["hf_keys"] = renamed


def from_pretrained(folder: str, *, verify: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` (or by :func:`brainsurgeon.export.save` on an
    HF model): config from the manifest, structure overrides, then the weights; identical outputs.

    >>> model = from_pretrained("out/bert-pruned")
    """
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        raise FormatError(f"{folder} has no {MANIFEST}; for a plain HF folder use "
                          f"transformers.AutoModel.from_pretrained({folder!r})")
    return load(folder, folder, verify=verify)
