"""Keep a transformers config in step with a pruned model, so save_pretrained/from_pretrained round-trip.

    >>> g.prune(groups)                 # calls sync_hf_config(model) after every committed step
    >>> model.config.intermediate_size, model.config.num_key_value_heads
    (12, 1)

Widths that are equal in every layer are written to the standard fields (``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) when the config
still validates. Per-layer widths the config cannot express are recorded in
``config.brainsurgeon_layer_widths`` ({module name: {field: value}}), which a loader must apply before
``load_state_dict`` (``brainsurgeon.export.from_pretrained`` does); the standard fields then keep their old
values. After within-head pruning the kept rotary frequencies (``inv_freq``, not saved by HF) are recorded too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._hf import embedding

# child names of the query/key/value projections in transformers attention modules (one list for the graph's
# HF config sync, the HF attention fixer and head pruning)
Q_NAMES = ("q_proj", "query", "q", "q_lin", "query_proj")
K_NAMES = ("k_proj", "key", "k", "k_lin", "key_proj")
V_NAMES = ("v_proj", "value", "v", "v_lin", "value_proj")
_UP = ("up_proj", "fc1", "c_fc", "w1", "gate_proj", "lin1", "wi", "wi_0", "dense_h_to_4h", "gate_up_proj")
_FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")
_DOWN = ("down_proj", "fc2", "c_proj", "w2", "lin2", "wo", "dense_4h_to_h")
# where configs keep the FFN width (BERT/LLaMA, OPT, BART, T5, DistilBERT, GPT-2, Falcon)
FFN_FIELDS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "hidden_dim", "n_inner",
              "ffn_hidden_size")


def _attr(m: nn.Module, name: str) -> Any:
    """``getattr(m, name, None)`` without ``nn.Module.__getattr__``'s raise-and-catch for missing names (it
    is asked ~30 names per module per config sync): the instance dict, then parameters, buffers and children,
    then the class (properties); a class with its own ``__getattr__`` is asked directly."""
    if type(m).__getattr__ is not nn.Module.__getattr__:
        return getattr(m, name, None)
    d = m.__dict__
    if name in d:
        return d[name]
    for store in (d.get("_parameters"), d.get("_buffers"), d.get("_modules")):
        if store is not None and name in store:
            return store[name]
    return getattr(m, name, None) if hasattr(type(m), name) else None


_ON_CLASS: dict[tuple[type, str], bool] = {}   # hasattr(class, name), asked once per (class, name)


def _child(m: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The first of ``names`` that is a submodule with a ``weight`` (as ``_attr`` reads them: ~35 names per
    module per config sync, so parameters and buffers, never modules, are passed over without a lookup)."""
    cls = type(m)
    if cls.__getattr__ is not nn.Module.__getattr__:
        stores = None
    else:
        d = m.__dict__
        stores = (d, d.get("_parameters") or {}, d.get("_buffers") or {}, d.get("_modules") or {})
    for n in names:
        if stores is None:
            c = getattr(m, n, None)
        elif n in stores[0]:
            c = stores[0][n]
        elif n in stores[1] or n in stores[2]:
            continue   # a tensor
        elif n in stores[3]:
            c = stores[3][n]
        else:
            key = (cls, n)
            on = _ON_CLASS.get(key)
            if on is None:
                on = _ON_CLASS[key] = hasattr(cls, n)
            if not on:
                continue
            c = getattr(m, n, None)
        if isinstance(c, nn.Module) and hasattr(c, "weight"):
            return c
    return None


def _out_width(m: nn.Module) -> int:
    w = m.weight
    return int(w.shape[1] if type(m).__name__ == "Conv1D" else w.shape[0])


def _is_leaf(m: nn.Module) -> bool:
    """No submodules and the usual ``nn.Module`` attribute lookup: :func:`_child` finds nothing on it."""
    return not m._modules and type(m).__getattr__ is nn.Module.__getattr__


def layer_widths(model: nn.Module) -> dict[str, Any]:
    """Per-module widths: attention heads/kv heads/head_dim (from the q/k projections), MLP intermediate
    size, and the values of non-persistent rotary tables (``inv_freq``, sliced by within-head pruning)."""
    return _widths(model)[0]


def _widths(model: nn.Module) -> tuple[dict[str, Any], bool]:
    """:func:`layer_widths`, and whether the model has rotary tables (a module with an ``inv_freq`` tensor; they
    are sized from ``config.head_dim`` when it is set), from the same walk."""
    cfg = getattr(model, "config", None)
    out: dict[str, Any] = {}
    rope = False
    for name, m in model.named_modules():
        # a leaf (no submodules, the usual nn.Module attribute lookup) has none of the children asked below:
        # only its own tensors (rotary tables, fused experts, embedding scale) are read
        leaf = _is_leaf(m)
        q = None if leaf else _child(m, Q_NAMES)
        k = None if leaf else _child(m, K_NAMES)
        head = None if leaf else (_attr(m, "head_dim") or _attr(m, "attention_head_size") or _attr(m, "head_size"))
        if q is not None and k is not None and isinstance(head, int) and head > 0:
            out[name] = {"num_attention_heads": _out_width(q) // head, "num_key_value_heads": _out_width(k) // head,
                         "head_dim": head}
        elif isinstance(head, int) and head > 0 and _child(m, _FUSED_QKV) is not None:   # Phi3, Falcon, GPT-2
            out[name] = {"head_dim": head}
            fused = _child(m, _FUSED_QKV)
            if type(fused).__name__ == "Conv1D" and isinstance(getattr(m, "num_heads", None), int):
                out[name]["num_attention_heads"] = m.num_heads
            elif isinstance(getattr(m, "query_key_value", None), nn.Module) and \
                    isinstance(getattr(m, "head_size", None), int):
                out[name]["num_attention_heads"] = _out_width(fused) // (3 * head)   # GPT-NeoX: [heads, 3, head]
        inv = _attr(m, "inv_freq")   # rotary tables are not saved (non-persistent): keep the kept values
        rope = rope or isinstance(inv, torch.Tensor)
        if isinstance(inv, torch.Tensor) and "inv_freq" in getattr(m, "_non_persistent_buffers_set", ()):
            out.setdefault(name, {})["inv_freq"] = [float(v) for v in inv.detach().cpu().double().tolist()]
        up = None if leaf else _child(m, _UP)
        if up is not None and (_child(m, _DOWN) is not None or name.endswith("mlp")):
            width = _out_width(up) // (2 if _child(m, ("gate_up_proj",)) is up else 1)   # Phi3: gate and up fused
            out.setdefault(name, {})["intermediate_size"] = width
        experts = _attr(m, "gate_up_proj")   # MoE experts as one tensor [E, 2 x intermediate, hidden]
        if isinstance(experts, nn.Parameter) and experts.dim() == 3:
            out.setdefault(name, {})["intermediate_size"] = int(experts.shape[1]) // 2
        scale = _attr(m, "embed_scale")   # Gemma: sqrt(hidden_size) at build time, not saved
        if isinstance(scale, torch.Tensor) and "embed_scale" in getattr(m, "_non_persistent_buffers_set", ()):
            out.setdefault(name, {})["embed_scale"] = float(scale)
        if name.endswith("intermediate") and hasattr(m, "dense"):
            out.setdefault(name, {})["intermediate_size"] = _out_width(m.dense)
    emb = embedding(model, "input")   # None on vision/audio models (ConvNext, CLIP, MobileViT, Wav2Vec2)
    if cfg is not None and isinstance(emb, nn.Embedding):
        out[""] = {"hidden_size": int(emb.weight.shape[1])}
    elif cfg is not None and isinstance(getattr(cfg, "hidden_size", None), int):   # ViT-like: the norms' width
        norms = {int(m.weight.shape[0]) for m in model.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
                 and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1}
        if len(norms) == 1:
            out[""] = {"hidden_size": norms.pop()}
    return out, rope


def _valid(cfg: Any) -> bool:
    """Whether the config passes its own checks (``validate``, where the transformers version has one)."""
    try:
        if callable(getattr(cfg, "validate", None)):
            cfg.validate()
        return True
    except Exception:  # noqa: BLE001  (validators raise ValueError or hub-specific error types)
        return False


def sync_hf_config(model: nn.Module) -> dict[str, Any]:
    """Write uniform widths to ``model.config``; record the rest per layer. Returns the fields changed."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not type(model).__module__.startswith("transformers."):
        return {}
    widths, rope = _widths(model)
    changed: dict[str, Any] = {}
    old: dict[str, Any] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    fields = {f for w in widths.values() for f in w}
    hidden0 = getattr(cfg, "hidden_size", None)
    explicit_only: set[str] = set()
    # hidden_size first: some configs derive other fields from it (Falcon's head_dim property)
    for f in sorted(fields - {"inv_freq", "embed_scale"}, key=lambda f: (f != "hidden_size", f)):
        values = {name: w[f] for name, w in widths.items() if f in w}
        uniform = len(set(map(str, values.values()))) == 1
        v0 = next(iter(values.values()))
        if f == "intermediate_size" and uniform and not hasattr(cfg, f) and _ffn_fields(cfg):
            for alias in _ffn_fields(cfg):   # the family's own FFN field(s)
                if getattr(cfg, alias, None) != v0:
                    old[alias] = getattr(cfg, alias)
                    setattr(cfg, alias, v0)
                    changed[alias] = v0
            continue
        if f == "head_dim" and uniform and getattr(cfg, f, None) != v0 and \
                (getattr(cfg, f, None) is not None or rope):
            try:   # explicit: rotary tables and attention read config.head_dim first
                prev = getattr(cfg, f, None)
                setattr(cfg, f, v0)
                old[f], changed[f] = prev, v0
                heads0 = getattr(cfg, "num_attention_heads", None)
                derived = prev if prev is not None else (hidden0 // heads0 if isinstance(hidden0, int) and
                                                         isinstance(heads0, int) and heads0 else None)
                if derived == v0:
                    explicit_only.add(f)   # the same value, now written: the rotary tables are unchanged
            except AttributeError:   # a read-only property (Falcon): per layer, with the rotary tables
                for name, v in values.items():
                    per_layer.setdefault(name, {})[f] = v
            continue
        if uniform and getattr(cfg, f, None) == v0:
            continue   # unchanged everywhere
        if f == "num_key_value_heads" and not hasattr(cfg, f):
            continue
        derived = f in ("num_attention_heads", "num_key_value_heads") and getattr(cfg, "head_dim", None) is None
        if f == "head_dim" and getattr(cfg, f, None) is None:   # BERT-style: derived from hidden / heads
            heads = getattr(cfg, "num_attention_heads", 1)
            hidden = getattr(cfg, "hidden_size", 0)
            if isinstance(heads, int) and isinstance(hidden, int) and set(values.values()) == {hidden // max(1, heads)}:
                continue
        derived = derived or not hasattr(cfg, f)            # e.g. head_dim of a BERT config: per layer
        if len(set(values.values())) == 1 and not derived:   # BERT-style configs derive head size from heads
            v = next(iter(values.values()))
            if getattr(cfg, f, None) != v and hasattr(cfg, f):
                old[f] = getattr(cfg, f)
                setattr(cfg, f, v)
                changed[f] = v
        else:
            for name, v in values.items():
                per_layer.setdefault(name, {})[f] = v
    if "hidden_size" in changed and getattr(cfg, "word_embed_proj_dim", None) == hidden0:   # OPT: no projection
        old["word_embed_proj_dim"] = hidden0
        cfg.word_embed_proj_dim = changed["hidden_size"]
        changed["word_embed_proj_dim"] = changed["hidden_size"]
    if changed and not _valid(cfg):   # e.g. hidden_size no longer a multiple of the heads: keep it per layer
        for f in list(changed):
            setattr(cfg, f, old[f])
            del changed[f]
            for name, w in widths.items():
                if f in w:
                    per_layer.setdefault(name, {})[f] = w[f]
    if "hidden_size" in changed or "hidden_size" in per_layer.get("", {}):   # values derived from the old width
        for name, w in widths.items():
            if "embed_scale" in w:
                per_layer.setdefault(name, {})["embed_scale"] = w["embed_scale"]
    before = getattr(cfg, "brainsurgeon_layer_widths", None) or {}
    sliced = "head_dim" in changed and "head_dim" not in explicit_only
    if sliced or any("head_dim" in w for w in per_layer.values()) or \
            any("inv_freq" in w for w in before.values()):   # rotary tables sliced with the head dims
        for name, w in widths.items():
            if "inv_freq" in w:
                per_layer.setdefault(name, {})["inv_freq"] = w["inv_freq"]
    if per_layer:
        cfg.brainsurgeon_layer_widths = per_layer
        changed["brainsurgeon_layer_widths"] = per_layer
    elif hasattr(cfg, "brainsurgeon_layer_widths"):
        del cfg.brainsurgeon_layer_widths
    return changed


def _ffn_fields(cfg: Any) -> list[str]:
    keys = cfg.to_dict()
    return [f for f in FFN_FIELDS if f in keys]


def _no_init_weights() -> Any:
    """transformers' context that skips weight initialisation (where this version has one)."""
    import contextlib
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def rebuild_mismatches(model: nn.Module) -> list[str]:
    """State-dict keys whose shape differs in ``type(model)(model.config)`` (built on the meta device):
    what HF's own ``from_pretrained`` could not load. Empty when the config expresses every width.

    >>> rebuild_mismatches(pruned_bloom)   # Bloom's MLP is always 4 x hidden_size
    ['transformer.h.0.mlp.dense_h_to_4h.weight', ...]
    """
    import contextlib
    import copy

    cfg = getattr(model, "config", None)
    if cfg is None or not type(model).__module__.startswith("transformers."):
        return []
    size = _state_bytes(model)
    if size is None:
        size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    # shapes only, weight initialisation skipped; a small model is built on the CPU (uninitialised memory),
    # ~1.5x faster than on the meta device, whose device mode intercepts every torch call of the build
    small = size <= _CPU_BUILD_BYTES
    try:
        clean = copy.deepcopy(cfg)
        if hasattr(clean, "brainsurgeon_layer_widths"):
            del clean.brainsurgeon_layer_widths
        with contextlib.nullcontext() if small else torch.device("meta"), _no_init_weights():
            fresh = type(model)(clean)
    except Exception:  # noqa: BLE001  (a config this class cannot build from: nothing HF's loader can do either)
        return ["<config does not rebuild the model>"]
    bad: list[str] = []
    if _differing(model, fresh, "", bad):
        return bad
    # a module customises its state dict: ask the state dicts themselves
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return [k for k, v in model.state_dict().items() if k in want and want[k] != tuple(v.shape)]


_PLAIN_SD: dict[type, bool] = {}   # class -> its state dict is nn.Module's own (no override of the hooks below)


def _plain_state_dict(m: nn.Module) -> bool:
    """Whether ``m.state_dict()`` lists exactly its non-None parameters and persistent buffers (then its
    children's): no state-dict hooks, no own ``state_dict``/``_save_to_state_dict``/``get_extra_state``."""
    if m._state_dict_hooks or m._state_dict_pre_hooks:
        return False
    cls = type(m)
    plain = _PLAIN_SD.get(cls)
    if plain is None:
        plain = _PLAIN_SD[cls] = cls.state_dict is nn.Module.state_dict \
            and cls._save_to_state_dict is nn.Module._save_to_state_dict \
            and getattr(cls, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
    return plain


def _state_bytes(model: nn.Module) -> int | None:
    """The bytes of ``model.state_dict()``'s tensors (a module shared under two names counted under both),
    read from the modules' own dicts; None where a module customises its state dict."""
    if not _plain_state_dict(model):
        return None
    skip = model._non_persistent_buffers_set
    n = sum(t.numel() * t.element_size() for t in model._parameters.values() if t is not None) + \
        sum(t.numel() * t.element_size() for k, t in model._buffers.items() if t is not None and k not in skip)
    for c in model._modules.values():
        if c is not None:
            sub = _state_bytes(c)
            if sub is None:
                return None
            n += sub
    return n


def _differing(a: nn.Module, b: nn.Module, prefix: str, bad: list[str]) -> bool:
    """Append to ``bad`` the state-dict keys of ``a`` that ``b`` has too, with another shape, in ``a``'s
    state-dict order (keys only one of them has are passed over, as a comparison of the two state dicts
    would); both walked in step, no key built for a matching tensor. False where a module of either
    customises its state dict (``bad`` is then incomplete: ask the state dicts)."""
    if not (_plain_state_dict(a) and _plain_state_dict(b)):
        return False
    skip_a, skip_b = a._non_persistent_buffers_set, b._non_persistent_buffers_set
    bp, bb = b._parameters, b._buffers
    for k, t in a._parameters.items():
        if t is not None:
            u = bp.get(k)
            if u is None and k not in bp:   # a buffer of the same name in b is the same state-dict key
                u = bb.get(k) if k not in skip_b else None
            if u is not None and u.shape != t.shape:
                bad.append(prefix + k)
    for k, t in a._buffers.items():
        if t is not None and k not in skip_a:
            u = bb.get(k) if k not in skip_b else None
            if u is None and k not in bb:
                u = bp.get(k)
            if u is not None and u.shape != t.shape:
                bad.append(prefix + k)
    am, bm = a._modules, b._modules
    for k, c in am.items():
        if c is not None:
            d = bm.get(k)
            if d is not None:
                if not _differing(c, d, prefix + k + ".", bad):
                    return False
            elif _state_bytes(c) is None:   # keys b does not have; still, a customised state dict is asked
                return False
    return all(_state_bytes(d) is not None for k, d in bm.items() if d is not None and am.get(k) is None)


_CPU_BUILD_BYTES = 64 << 20   # rebuild_mismatches: models up to this size (weights + buffers) are built on the CPU


def mark_rebuild_(model: nn.Module) -> bool:
    """After pruning: when the config cannot rebuild the pruned shapes, make sure a per-layer record exists,
    so ``brainsurgeon.export.from_pretrained`` resizes every tensor to the saved one. True when the model
    carries such a record (it must be reloaded with that loader). A record the config sync already wrote
    makes that loader resize every tensor anyway, so then the rebuild check (a model built on the meta
    device, the costliest step of a small HF prune) is skipped."""
    cfg = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and getattr(cfg, "brainsurgeon_layer_widths", None):
        return True
    bad = rebuild_mismatches(model)
    if bad and cfg is not None:
        rec = dict(getattr(cfg, "brainsurgeon_layer_widths", None) or {})
        rec.setdefault("", {})["rebuild_from_weights"] = len(bad)
        cfg.brainsurgeon_layer_widths = rec
    return bool(bad)
