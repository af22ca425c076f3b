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

# child names of the query/key/value projections in transformers attention modules (one list for the graph's
# HF config sync, the HF attention fixer and head pruning)
Q_NAMES = ("q_proj", "query", "q")
K_NAMES = ("k_proj", "key", "k")
V_NAMES = ("v_proj", "value", "v")
_UP = ("up_proj", "fc1", "c_fc", "w1", "gate_proj")


def _child(m: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        c = getattr(m, n, None)
        if isinstance(c, nn.Module) and hasattr(c, "weight"):
            return c
    return None


def _out_width(m: nn.Module) -> int:
    w = m.weight
    return int(w.shape[1] if type(m).__name__ == "Conv1D" else w.shape[0])


def layer_widths(model: nn.Module) -> dict[str, Any]:
    """Per-module widths: attention heads/kv heads/head_dim (from the q/k projections), MLP intermediate
    size, and the values of non-persistent rotary tables (``inv_freq``, sliced by within-head pruning)."""
    cfg = getattr(model, "config", None)
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        q, k = _child(m, Q_NAMES), _child(m, K_NAMES)
        head = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        if q is not None and k is not None and isinstance(head, int) and head > 0:
            out[name] = {"num_attention_heads": _out_width(q) // head, "num_key_value_heads": _out_width(k) // head,
                         "head_dim": head}
        inv = getattr(m, "inv_freq", None)   # rotary tables are not saved (non-persistent): keep the kept values
        if isinstance(inv, torch.Tensor) and "inv_freq" in getattr(m, "_non_persistent_buffers_set", ()):
            out.setdefault(name, {})["inv_freq"] = [float(v) for v in inv.detach().cpu().double().tolist()]
        up = _child(m, _UP)
        if up is not None and (_child(m, ("down_proj", "fc2", "c_proj", "w2")) is not None or name.endswith("mlp")):
            out.setdefault(name, {})["intermediate_size"] = _out_width(up)
        if name.endswith("intermediate") and hasattr(m, "dense"):
            out.setdefault(name, {})["intermediate_size"] = _out_width(m.dense)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if cfg is not None and isinstance(emb, nn.Embedding):
        out[""] = {"hidden_size": int(emb.weight.shape[1])}
    return out


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
    widths = layer_widths(model)
    changed: dict[str, Any] = {}
    old: dict[str, Any] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    fields = {f for w in widths.values() for f in w}
    for f in sorted(fields - {"inv_freq"}):   # rotary tables: recorded below, only with sliced head dims
        values = {name: w[f] for name, w in widths.items() if f in w}
        if len(set(map(str, values.values()))) == 1 and getattr(cfg, f, None) == next(iter(values.values())):
            continue   # unchanged everywhere
        if f == "num_key_value_heads" and not hasattr(cfg, f):
            continue
        derived = f in ("num_attention_heads", "num_key_value_heads") and getattr(cfg, "head_dim", None) is None
        if f == "head_dim" and getattr(cfg, f, None) is None:   # BERT-style: derived from hidden / heads
            base = getattr(cfg, "hidden_size", 0) // max(1, getattr(cfg, "num_attention_heads", 1))
            if set(values.values()) == {base}:
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
    if changed and not _valid(cfg):   # e.g. hidden_size no longer a multiple of the heads: keep it per layer
        for f in list(changed):
            setattr(cfg, f, old[f])
            del changed[f]
            for name, w in widths.items():
                if f in w:
                    per_layer.setdefault(name, {})[f] = w[f]
    before = getattr(cfg, "brainsurgeon_layer_widths", None) or {}
    if "head_dim" in changed or any("head_dim" in w for w in per_layer.values()) or \
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
