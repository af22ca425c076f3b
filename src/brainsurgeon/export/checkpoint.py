"""`save` and `load`: a compressed model as safetensors weights + a JSON manifest, never a pickle.

    >>> save(model, "out/ckpt", recipe=recipe, plan=plan, history=report)
    >>> again = load("out/ckpt", DigitsCNN)          # builds the dense model, rebuilds what changed
    >>> torch.equal(again(x), model(x))
    True

`load` calls `model_fn()` for the dense architecture (or builds an HF model from an id/path),
replaces every module whose format or shapes differ from the manifest's spec (structurally
pruned Linear/Conv/BatchNorm/..., registered compressed formats), restores recorded scalar
attributes, then assigns the saved tensors (dtype and all) and re-ties shared ones.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from .._log import get_logger
from ..errors import FormatError
from .folder import check_target, commit_folder, recover, temp_folder
from .manifest import (
    CHECKPOINT_VERSION,
    DIGEST,
    MANIFEST,
    WEIGHTS,
    check_weights_file,
    manifest_digest,
    read_manifest,
    sha256_file,
    to_json,
    versions,
)
from .specs import build_module, check_rebuildable, jsonable, module_spec, resize_like_, same_structure, spec_bytes

log = get_logger(__name__)

ModelFn = Callable[[], nn.Module] | str
_PICKLE_EXT = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def find_aliases(model: nn.Module) -> dict[str, str]:
    """alias -> primary key for state_dict entries that are the same tensor (tied weights).

    >>> find_aliases(tied_lm)
    {'lm_head.weight': 'model.embed_tokens.weight'}
    """
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for k, t in model.state_dict().items():
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() and sig in seen:
            aliases[k] = seen[sig]
        else:
            seen[sig] = k
    return aliases


def split_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict as contiguous CPU tensors with each shared tensor once, and alias -> primary key.

    Tensors are not copied unless they must be: a view that shares storage with another key (which
    safetensors refuses) is cloned, a non-contiguous or non-CPU one is copied by contiguous()/to().
    """
    aliases = find_aliases(model)
    sd = {k: t.detach() for k, t in model.state_dict().items() if k not in aliases}
    owners: dict[int, int] = {}
    for t in sd.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    out = {}
    for k, t in sd.items():
        if t.is_meta:
            raise FormatError(f"tensor {k!r} is on the meta device (no data); materialize the weights "
                              f"(e.g. model.to_empty(device=...) and load them) before saving")
        t = t.to("cpu").contiguous()
        if t.numel() and (owners.get(t.untyped_storage().data_ptr(), 0) > 1
                          or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # a view into a larger or shared buffer: store only its own elements
        out[k] = t
    return out, aliases


def _structure(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[int]]]:
    """Per-module specs (registered formats, standard torch modules); scalar attrs and the shapes of the
    own saved tensors of the others (a Swin block's ``relative_position_bias_table``, a norm's weight)."""
    modules: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if (parametrize.is_parametrized(m) and not _weight_norm_only(m)) or any(
                isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values()):
            raise FormatError(f"module {name or type(model).__name__!r} carries a parametrization or a "
                              f"torch.nn.utils.prune mask (code, not data); make it permanent first with "
                              f"torch.nn.utils.prune.remove(module, 'weight') or "
                              f"parametrize.remove_parametrizations(module, 'weight')")
        entry = None if parametrize.is_parametrized(m) else module_spec(m)
        if entry is not None:
            entry = {**entry, "spec": jsonable(entry["spec"])}
            if "format" in entry and not entry["format"].startswith(("torch.", "hf.")):
                modules[name] = entry  # registered compressed formats describe themselves
                continue
            check_rebuildable(name or type(model).__name__, m, entry)  # refuse before writing anything
            modules[name] = entry
            if "subclass" not in entry:
                continue
        else:
            shapes.update(_own_shapes(name, m))
        scal = {k: v for k, v in vars(m).items()
                if not k.startswith("_") and k != "training" and (v is None or isinstance(v, (bool, int, float, str)))}
        if scal:
            attrs[name] = scal
    return modules, attrs, shapes


def _weight_norm_only(m: nn.Module) -> bool:
    """`m` is parametrized only by torch's weight norm (wav2vec2's ``pos_conv_embed.conv``): data, not code.

    Its tensors (``parametrizations.weight.original0/1``, g and v) are saved as they are; the model_fn's
    module carries the same parametrization, and the recorded shapes and size attributes resize it.
    """
    from torch.nn.utils.parametrizations import _WeightNorm

    return all(isinstance(p, _WeightNorm) for plist in m.parametrizations.values() for p in plist)


def _own_shapes(name: str, m: nn.Module) -> dict[str, list[int]]:
    """Shapes of `m`'s own parameters and persistent buffers, by state_dict key."""
    own = list(m._parameters.items()) + [(k, b) for k, b in m._buffers.items()
                                         if k not in m._non_persistent_buffers_set]
    return {f"{name}.{k}" if name else k: list(t.shape) for k, t in own if t is not None}


def _resize_tensors(model: nn.Module, shapes: dict[str, Any], limit: Any) -> int:
    """Give each recorded tensor whose built shape differs the saved shape (uninitialised: the weights
    file fills it, and assign_tensors checks every shape against it). Returns how many were resized."""
    n = 0
    for key, shape in shapes.items():
        prefix, _, attr = key.rpartition(".")
        owner = _submodule(model, prefix) if prefix else model
        t = getattr(owner, attr, None)
        if not isinstance(t, torch.Tensor) or list(t.shape) == list(shape):
            continue
        if not all(isinstance(d, int) and d >= 0 for d in shape) or (
                isinstance(limit, int) and math.prod(shape) * t.element_size() > 4 * limit + (1 << 20)):
            raise FormatError(f"tensor {key!r}: saved shape {shape} is not a shape the weights file "
                              f"({limit} bytes) could fill; the manifest is damaged, save the model again")
        new = torch.empty(shape, dtype=t.dtype, device=t.device)
        if isinstance(t, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            owner._buffers[attr] = new
        n += 1
    return n


def _hf_config(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(getattr(cfg, "to_dict", None)) or not hasattr(cfg, "model_type"):
        return None
    out = to_json(cfg.to_dict(), "hf_config")
    attn = getattr(cfg, "_attn_implementation", None)
    if isinstance(out, dict) and isinstance(attn, str):   # to_dict() drops it: reload with the same kernels
        out.setdefault("attn_implementation", attn)
    return out


def build_manifest(model: nn.Module, aliases: dict[str, str], recipe: Any, plan: Any, history: Any) -> dict[str, Any]:
    """The manifest dict for `model` (weights fields are filled in once the file is written)."""
    modules, attrs, shapes = _structure(model)
    cls = type(model)
    return {"brainsurgeon_checkpoint": CHECKPOINT_VERSION, "versions": versions(),
            "model_class": f"{cls.__module__}.{cls.__qualname__}", "weights": {"file": WEIGHTS},
            "aliases": aliases, "modules": modules, "attrs": attrs, "shapes": shapes,
            "recipe": to_json(recipe, "recipe"), "plan": to_json(plan, "plan"), "history": to_json(history, "history"),
            "hf_config": _hf_config(model)}


def write_manifest(tmp: str, manifest: dict[str, Any]) -> None:
    """Fill in the weights file's size and SHA-256 and write ``manifest.json`` into `tmp`."""
    w = os.path.join(tmp, manifest["weights"]["file"])
    fd = os.open(w, os.O_RDONLY)
    try:
        os.fsync(fd)  # the weights are on disk before the folder is renamed into place
    finally:
        os.close(fd)
    manifest["weights"].update(bytes=os.path.getsize(w), sha256=sha256_file(w))
    manifest[DIGEST] = manifest_digest(manifest)  # verify=True refuses a manifest edited later
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def save(model: nn.Module, folder: str, recipe: Any = None, plan: Any = None, history: Any = None) -> str:
    """Write `model` to `folder` as ``model.safetensors`` + ``manifest.json``, atomically; returns the path.

    recipe/plan/history: anything JSON-like (a Recipe, {layer: Config}, a CompressionReport,
    a pruning history list) stored in the manifest. The folder appears complete or not at all;
    an existing checkpoint there is replaced only once the new one is fully written.

    >>> save(model, "out/ckpt", recipe=load_recipe("recipes/digits-obs75-obq4.yaml"))
    'out/ckpt'
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise FormatError(f"save() writes an nn.Module, got {type(model).__name__}; for a bare state_dict use "
                          f"safetensors.torch.save_file")
    if not isinstance(folder, str | os.PathLike):
        raise FormatError(f"save(): folder must be a path, got {folder!r}")
    folder = os.fspath(folder)
    check_target(folder)
    tensors, aliases = split_tensors(model)
    manifest = build_manifest(model, aliases, recipe, plan, history)
    tmp = temp_folder(folder)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        write_manifest(tmp, manifest)
        commit_folder(tmp, os.path.abspath(folder))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d tensors (%d aliases, %d module specs) to %s", len(tensors), len(aliases),
             len(manifest["modules"]), folder)
    return folder


def _refuse_pickle(path: str) -> None:
    raise FormatError(f"{path} is a pickle (torch.save/PyTorch .bin); unpickling can run arbitrary code, so "
                      f"load() refuses it. Re-save it with brainsurgeon.export.save, or pass allow_pickle=True "
                      f"if you trust the file (it is then read with torch.load(weights_only=True))")


def _is_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    # protocol-2+ pickles start with 0x80; torch.save's default zip container with "PK\x03\x04"
    return head[:1] == b"\x80" or head == b"PK\x03\x04" or path.endswith(_PICKLE_EXT)


def _build(model_fn: ModelFn, manifest: dict[str, Any] | None) -> nn.Module:
    if isinstance(model_fn, str):
        from .hf_build import build_hf_model

        manifest = manifest or {}
        return build_hf_model(model_fn, manifest.get("hf_config"), manifest.get("model_class"))
    if not callable(model_fn):
        raise FormatError(f"model_fn must be a callable that builds the dense model (e.g. a model class) or an "
                          f"HF model id/path, got {model_fn!r}")
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise FormatError(f"model_fn() returned {type(model).__name__}, not an nn.Module; pass the model class or "
                          f"a function that returns the dense model")
    return model


def apply_structure(model: nn.Module, manifest: dict[str, Any], device: torch.device | None = None) -> int:
    """Rebuild every module whose format/spec differs from the manifest (on `device`); set recorded attrs.

    Returns the number of modules rebuilt.
    """
    rebuilt = 0
    limit = manifest.get("weights", {}).get("bytes")
    for name, entry in manifest.get("modules", {}).items():
        cur = _submodule(model, name)
        if same_structure(cur, entry):
            continue
        need = spec_bytes(entry)  # validated on the meta device: nothing is allocated yet
        if need is not None and isinstance(limit, int) and need > 4 * limit + (1 << 20):
            raise FormatError(f"module {name!r}: its spec {entry.get('spec')} would allocate {need:,} bytes, more "
                              f"than the whole weights file ({limit:,} bytes) could fill; the manifest is damaged, "
                              f"save the model again")
        sub = entry.get("subclass")
        if sub is not None:
            if f"{type(cur).__module__}.{type(cur).__qualname__}" != sub:
                raise FormatError(f"module {name!r} was saved as {sub} but model_fn built "
                                  f"{type(cur).__module__}.{type(cur).__qualname__}; pass the model_fn that built "
                                  f"the saved model")
            resize_like_(cur, entry, device)  # keep the user's class (its forward), resize its tensors
            rebuilt += 1
            continue
        new = build_module(entry)
        new.train(cur.training)
        if device is not None:
            new.to(device)
        if name:
            model.set_submodule(name, new)
        else:
            raise FormatError(f"the saved root module has format {entry.get('format')} but model_fn built "
                              f"{type(model).__name__}; pass the model_fn that built the saved model")
        rebuilt += 1
    for name, values in manifest.get("attrs", {}).items():
        cur = _submodule(model, name)
        for k, v in values.items():
            if k in vars(cur) and vars(cur)[k] != v:
                setattr(cur, k, v)
    return rebuilt + _resize_tensors(model, manifest.get("shapes", {}), limit)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise FormatError(f"the checkpoint has module {name!r} but the model built by model_fn "
                          f"({type(model).__name__}) does not; pass the model_fn that built the saved model") from e


def _read_safetensors(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each copied into freshly allocated memory on `device`.

    safetensors hands out CPU tensors that view the memory-mapped file at the file's byte offsets,
    which are not aligned: int8/int4 CPU kernels crash on them, and they would pin the file. The
    copy is made one tensor at a time (peak memory: the model plus one tensor).
    """
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.to(device, copy=True) if t.device == device else t.to(device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FormatError(f"{path} is not a readable safetensors file ({e}); it is corrupted or truncated. "
                          f"Copy it again or save the model again") from e
    return out


def assign_tensors(model: nn.Module, sd: dict[str, torch.Tensor], aliases: dict[str, str], source: str) -> None:
    """Strictly check keys and shapes against `model`, assign the tensors, re-tie aliases."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in aliases]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: saved {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sd if k in expected and sd[k].shape != expected[k].shape]
    bad_alias = [a for a, p in aliases.items() if p not in sd]
    if missing or unexpected or shapes or bad_alias:
        parts = [f"missing tensors {missing[:5]}" if missing else "",
                 f"unexpected tensors {unexpected[:5]}" if unexpected else "",
                 f"shape mismatches {shapes[:5]}" if shapes else "",
                 f"aliases to absent tensors {bad_alias[:5]}" if bad_alias else ""]
        raise FormatError(f"{source} does not match {type(model).__name__}: " + "; ".join(p for p in parts if p)
                          + ". Pass the model_fn that built the saved (dense) model, with the same config")
    model.load_state_dict(sd, strict=False, assign=True)
    for alias, primary in aliases.items():
        p_owner, p_name = _owner(model, primary)
        a_owner, a_name = _owner(model, alias)
        setattr(a_owner, a_name, getattr(p_owner, p_name))


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, name = key.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), name


def _device(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.get_default_device()


def load(folder: str, model_fn: ModelFn, *, verify: bool = True, allow_pickle: bool = False) -> nn.Module:
    """Rebuild the model saved in `folder`: `model_fn()` builds the dense architecture (or an HF id/path).

    Outputs are identical to the saved model's. Tensors land on the device model_fn builds on.
    verify: check the weights' SHA-256 against the manifest. allow_pickle: accept a ``.pt/.bin``
    pickle (read with ``torch.load(weights_only=True)``); refused by default.

    >>> model = load("out/ckpt", DigitsCNN)
    >>> model = load("out/tiny-llama", "path/or/hf-id")
    """
    if not isinstance(folder, str | os.PathLike):
        raise FormatError(f"load(): folder must be the path of a checkpoint folder, got {folder!r}")
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        if not _is_pickle(folder):
            raise FormatError(f"{folder} is a file; load() reads a checkpoint folder written by save()")
        if not allow_pickle:
            _refuse_pickle(folder)
        return _load_pickle(folder, model_fn)
    if not os.path.isdir(folder):
        found = recover(folder)  # a save interrupted between its two renames left it in a sibling
        if found is None:
            raise FormatError(f"checkpoint folder {folder!r} not found; pass the folder written by save()")
        folder = found
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        pickles = sorted(f for f in os.listdir(folder) if f.endswith(_PICKLE_EXT))
        if pickles and not os.path.isfile(os.path.join(folder, WEIGHTS)):
            if not allow_pickle:
                _refuse_pickle(os.path.join(folder, pickles[0]))
            return _load_pickle(os.path.join(folder, pickles[0]), model_fn)
    manifest = read_manifest(folder)
    path = check_weights_file(folder, manifest, verify)
    model = _build(model_fn, manifest)
    device = _device(model)  # before rebuilding: new modules are created on the default device
    n = apply_structure(model, manifest, device)
    sd = _read_safetensors(path, device)
    renamed = manifest.get("hf_keys", {})  # save_pretrained's original-layout names -> state_dict names
    sd = {renamed.get(k, k): t for k, t in sd.items()}
    assign_tensors(model, sd, manifest.get("aliases", {}), path)
    log.info("loaded %s: %d tensors, %d modules rebuilt from specs", folder, len(sd), n)
    return model


def _load_pickle(path: str, model_fn: ModelFn) -> nn.Module:
    model = _build(model_fn, None)
    try:
        sd = torch.load(path, map_location=_device(model), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure becomes a FormatError naming the file
        raise FormatError(f"{path} could not be read with torch.load(weights_only=True) ({e}); it is corrupted "
                          f"or holds objects other than tensors") from e
    if not isinstance(sd, dict):
        raise FormatError(f"{path} holds a {type(sd).__name__}, not a state_dict; save model.state_dict()")
    assign_tensors(model, sd, {}, path)
    return model
