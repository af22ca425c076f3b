"""Build an HF model from a saved config, at the saved per-layer widths (no weights read here).

The floor below both :mod:`.checkpoint` (``load`` with an HF id/path) and :mod:`.hf`
(``save_pretrained``/``from_pretrained``), so neither imports the other in a circle.

    >>> model = build_hf_model("out/tiny-llama")       # reads out/tiny-llama/config.json, no weights
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .._log import get_logger
from ..errors import FormatError
from .manifest import WEIGHTS

log = get_logger(__name__)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise FormatError("loading an HF model needs transformers; pip install 'brainsurgeon[hf]'") from e
    return transformers


def _hf_class(transformers: Any, qualname: str | None, config: Any) -> Any:
    """The model class by name, looked up in the transformers package only (never imported from a path)."""
    names = []
    if isinstance(qualname, str) and qualname.startswith("transformers."):
        names.append(qualname.rsplit(".", 1)[1])
    names += list(getattr(config, "architectures", None) or [])
    for n in names:
        cls = getattr(transformers, n, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return transformers.AutoModel


def build_hf_model(id_or_path: str, hf_config: dict[str, Any] | None = None,
                   model_class: str | None = None) -> nn.Module:
    """An HF model with random weights from a saved config dict (preferred) or an id/path's config.

    >>> build_hf_model("out/tiny-llama")       # reads out/tiny-llama/config.json, no weights
    """
    transformers = _transformers()
    if hf_config is not None:
        d = dict(hf_config)
        model_type = d.pop("model_type", None)
        if not model_type:
            raise FormatError("the manifest's hf_config has no 'model_type'; save the model again")
        config = transformers.AutoConfig.for_model(model_type, **d)
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(id_or_path)
        except OSError as e:
            raise FormatError(f"cannot read an HF config from {id_or_path!r} ({e}); pass a local HF folder "
                              f"or an id available offline") from e
    cls = _hf_class(transformers, model_class, config)
    if cls is transformers.AutoModel:
        model = cls.from_config(config)
    else:
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    widths = getattr(config, "brainsurgeon_layer_widths", None)
    weights = os.path.join(id_or_path, WEIGHTS) if isinstance(id_or_path, str) else ""
    if widths and os.path.isfile(weights):
        shrink_to_saved(model, weights, widths)
    return model.eval()


def shrink_to_saved(model: nn.Module, weights: str, widths: dict[str, Any]) -> list[str]:
    """Give every parameter/buffer the shape it has in the ``weights`` file, fix the owning modules'
    attributes with the graph's fixers, and apply recorded non-persistent tables (``inv_freq``), so a model
    rebuilt from a config that cannot express per-layer widths takes the pruned model's weights.
    Returns the names of the tensors resized (their values are placeholders until the weights load).

    >>> shrink_to_saved(model, "out/bert-pruned/model.safetensors", config.brainsurgeon_layer_widths)
    """
    import torch
    from safetensors import safe_open

    from ..graph.surgery import find_fixer

    with safe_open(weights, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    resized: list[str] = []
    touched: set[str] = set()
    for key, t in list(model.state_dict(keep_vars=True).items()):
        want = shapes.get(key)
        if want is None or tuple(t.shape) == want:
            continue
        prefix, _, _ = key.rpartition(".")
        with torch.no_grad():
            t.data = torch.zeros(want, dtype=t.dtype, device=t.device)
        resized.append(key)
        parts = prefix.split(".") if prefix else []
        touched.update(".".join(parts[:i]) for i in range(len(parts), -1, -1))
    for name in sorted(touched, key=lambda n: -n.count(".")):   # children before their containers
        m = model.get_submodule(name)
        fixer = find_fixer(m)
        if fixer is not None:
            fixer(m, {})
    for name, w in widths.items():
        inv = w.get("inv_freq") if isinstance(w, dict) else None
        if inv is not None:
            m = model.get_submodule(name)
            buf = m.inv_freq
            m.inv_freq = torch.tensor(inv, dtype=torch.float64).to(buf.dtype).to(buf.device)
            if hasattr(m, "original_inv_freq"):
                m.original_inv_freq = m.inv_freq
        m = model.get_submodule(name)
        for k, v in (w.items() if isinstance(w, dict) else ()):   # recorded scalars the config cannot express
            cur = getattr(m, k, None)
            if k == "embed_scale" and isinstance(cur, torch.Tensor):   # Gemma: sqrt(the unpruned hidden size)
                m.embed_scale = torch.tensor(v, dtype=cur.dtype, device=cur.device)
                if hasattr(m, "scalar_embed_scale"):
                    m.scalar_embed_scale = v
            elif isinstance(cur, int) and not isinstance(cur, bool) and isinstance(v, int):   # e.g. Falcon head_dim
                setattr(m, k, v)
    log.info("rebuilt %s at the saved per-layer widths: %d tensors resized", type(model).__name__, len(resized))
    return resized
