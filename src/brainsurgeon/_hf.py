"""transformers models' embedding accessors, tolerated where a model has none.

``get_input_embeddings()`` / ``get_output_embeddings()`` raise NotImplementedError (ConvNext, CLIP,
MobileViT, Wav2Vec2) or AttributeError on models without that embedding, and plain torch modules have
neither method; callers want None then.

    >>> embedding(bert, "input")         # Embedding(30522, 384, padding_idx=0)
    >>> embedding(resnet, "output")      # None
"""

from __future__ import annotations

from torch import nn


def embedding(model: nn.Module, which: str) -> nn.Module | None:
    """``model.get_{which}_embeddings()`` (which: "input" or "output"), or None where the model has none."""
    get = getattr(model, f"get_{which}_embeddings", None)
    if not callable(get):
        return None
    try:
        out = get()
    except (NotImplementedError, AttributeError):
        return None
    return out if isinstance(out, nn.Module) else None
