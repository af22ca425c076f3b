"""Calibration that covers the vocabulary: single-token inputs of seeded tokens of the model's own vocabulary.

A sentence encoder is used on inputs its calibration never shows: a single word or a query whose tokens
occur in none of the calibration samples. The identity of a token is carried by the residual stream into
every layer, so the layers' inputs for an unseen word lie largely in directions the calibration Hessian
barely excites (bench/ood_diag.py: 15-70 % of a word token's energy on all-mpnet-base-v2, under 0.2 % of a
calibration token's), and GPTQ's error compensation (Frantar et al., 2023, eq. 3) is free to land there.
Short prefixes (``calib.lengths``) show the layers the length of such inputs, not their token identities.

:func:`vocab_singles` adds ``n`` inputs ``[start] t [end]`` (the calibration samples' own start/end tokens,
e.g. [CLS]/[SEP] or <s>/</s>), t drawn without replacement, with a fixed seed, from the model's input
embedding rows (``model.get_input_embeddings()``), leaving out the special tokens named in the model's
config (pad/bos/eos/cls/sep/mask/unk/decoder start), the samples' start/end tokens and their padding
token. No data: the sample depends only on the vocabulary size, the excluded ids and the seed; a
tokenizer's reserved rows ([unusedN]) cannot be told apart from the rest without the tokenizer and may be
drawn. The driver gives the singles a fixed share of each Hessian's trace (``calib.regimes``).

    >>> ids = vocab_ids(bert, 1024, seed=0, exclude=[101, 102, 0])   # the sampled token ids
    >>> extra = vocab_singles(samples, {}, ids, (1, 1))              # [((), {"input_ids": (256, 3), ...}), ...]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._hf import embedding
from .data import Batch

__all__ = ["heldout_ids", "special_ids", "vocab_ids", "vocab_singles", "vocab_size"]

SINGLES_PER_BATCH = 256  # the singles go in unpadded batches of this many
SPECIAL_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id",
                "unk_token_id", "decoder_start_token_id")


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``get_input_embeddings()``, an ``nn.Embedding``), or None.

    >>> vocab_size(bert)
    30522
    """
    emb = embedding(model, "input")
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def special_ids(model: nn.Module, extra: Iterable[int] = ()) -> set[int]:
    """Token ids left out of the sample: the config's special tokens (:data:`SPECIAL_KEYS`) and `extra` (the
    calibration samples' start/end tokens, their padding positions' ids).

    >>> sorted(special_ids(bert, [101, 102]))      # BertConfig names only pad_token_id = 0
    [0, 101, 102]
    """
    out = {int(x) for x in extra}
    cfg = getattr(model, "config", None)
    for key in SPECIAL_KEYS:
        v = getattr(cfg, key, None)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
                out.add(x)
    return out


def vocab_ids(model: nn.Module, n: int, seed: int = 0, exclude: Iterable[int] = ()) -> list[int]:
    """`n` token ids drawn without replacement (all of them if fewer) from ``range(vocab_size(model))`` minus
    ``special_ids(model, exclude)``, by a ``torch.Generator`` seeded with `seed`, in drawn order; [] without
    an input embedding. The bench uses it to count the evaluation words in the sample.

    >>> vocab_ids(bert, 3, seed=0, exclude=[101, 102])
    [17712, 1393, 26305]
    """
    V = vocab_size(model)
    if V is None or n <= 0:
        return []
    keep = torch.ones(V, dtype=torch.bool)
    drop = [i for i in special_ids(model, exclude) if 0 <= i < V]
    keep[drop] = False
    pool = keep.nonzero().flatten()
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return pool[order].tolist()


def heldout_ids(model: nn.Module, n: int, seed: int, exclude: Iterable[int], seen: Iterable[int]) -> list[int]:
    """`n` token ids drawn like :func:`vocab_ids` (with ``seed + 1``) and none of them in `seen` (the ids whose
    singles went into the Hessians): held-out inputs for GPTQ's guard (``CalibOptions.heldout_singles``).

    >>> held = heldout_ids(bert, 1024, 0, [101, 102], vocab_ids(bert, 1024, 0, [101, 102]))
    """
    seen = set(seen)
    return [i for i in vocab_ids(model, n + len(seen), seed + 1, exclude) if i not in seen][:n]


def vocab_singles(samples: list[dict[str, torch.Tensor]], shared: dict[str, Any], ids: list[int],
                  marks: tuple[int, int]) -> list[Batch]:
    """One input per id: the first sample's first ``start + 1 + end`` real positions with the content
    token replaced by the id (and the last by the sample's end token), so every per-token tensor
    (attention_mask, token_type_ids, position_ids) is a real one of a one-word input; batches of
    :data:`SINGLES_PER_BATCH`, no padding. `samples` / `shared` / `marks` as ``calib.lengths`` cuts them.

    >>> s = [{"input_ids": torch.tensor([101, 7, 8, 102]), "attention_mask": torch.ones(4, dtype=torch.long)}]
    >>> vocab_singles(s, {}, [5, 6], (1, 1))[0][1]["input_ids"].tolist()
    [[101, 5, 102], [101, 6, 102]]
    """
    if not ids or not samples:
        return []
    start, end = marks
    first = samples[0]
    size = start + 1 + end
    if len(first["input_ids"]) < size:
        return []
    row = {k: v[:size] for k, v in first.items()}
    out: list[Batch] = []
    for i in range(0, len(ids), SINGLES_PER_BATCH):
        chunk = torch.tensor(ids[i:i + SINGLES_PER_BATCH], dtype=row["input_ids"].dtype)
        kw = {k: v.expand(len(chunk), size).clone() for k, v in row.items()}
        kw["input_ids"][:, start] = chunk
        if end:
            kw["input_ids"][:, -1] = first["input_ids"][-1]
        out.append(((), {**shared, **kw}))
    return out
