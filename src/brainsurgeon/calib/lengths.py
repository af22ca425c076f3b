"""Calibration that mixes lengths: short prefixes of a bidirectional model's own token samples.

A bidirectional encoder (BERT, MPNet, ...) computes every token from the whole input, so a one- or
two-word input (a search query, a word-similarity probe) puts its layers in a regime - the special
tokens and a word or two attending only to each other - that is not a part of any long input's
activations. Calibration made only of sentences never shows the layers that regime; GPTQ fitted to
the sentences' Hessians is free to put its error in the directions short inputs excite (issue 15:
all-MiniLM-L6-v2 word similarity below round-to-nearest). A causal decoder is different: position t
sees only positions <= t, so a prefix's activations ARE the first positions of the full sample's and
prefixes would only add copies of rows H already has; nothing is added there.

:func:`mix_calibration` (the driver's entry point, ``CalibOptions.short_prefixes``) tests which of the
two the model is on one calibration sample (:func:`is_causal`: do a prefix's outputs equal the full
sample's first positions?) and, for a bidirectional model, appends :func:`short_prefixes` of the
calibration samples and ``CalibOptions.vocab_inputs`` single-token inputs of its vocabulary
(:mod:`~brainsurgeon.calib.vocab`), and labels each batch with its regime for the trace shares
(:mod:`~brainsurgeon.calib.regimes`). Only tokenizer batches take part (dicts with 2-D integer
``input_ids``); other data (images, float features) is returned as it is, without a note.

    >>> extra = short_prefixes(batches, (1, 2, 3, 4))     # sample j: its first 1, 2, 3, 4, 1, ... tokens
    >>> calib, labels, notes = mix_calibration(bert, batches, CalibOptions())
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..config import CalibOptions
from .data import (
    Batch,
    CachedBatches,
    cache_batches,
    first_tensor,
    is_one_shot,
    iter_batches,
    model_device,
    move_to,
)
from .regimes import HELDOUT, REGIMES
from .vocab import heldout_ids, special_ids, vocab_ids, vocab_singles, vocab_size

__all__ = ["is_causal", "mix_calibration", "mix_lengths", "short_prefixes", "token_batch"]

log = get_logger(__name__)

PROBE_TOKENS = 16  # is_causal changes the second half of a sample's first 16 real tokens
CAUSAL_RTOL = 1e-5  # max |difference| / max |output| at the shared positions under which the model is causal


def token_batch(batch: Batch) -> bool:
    """Whether a batch is a tokenizer's output: keyword arguments only, with 2-D integer ``input_ids``, an
    ``attention_mask`` (if any) of the same shape, and no other tensor that is not per token.

    >>> token_batch(((), {"input_ids": torch.ones(2, 5, dtype=torch.long)}))
    True
    """
    args, kw = batch
    ids = kw.get("input_ids")
    if args or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return False
    return all(v.shape[:2] == ids.shape for v in kw.values() if isinstance(v, torch.Tensor))


def _samples(batches: Iterable[Batch]) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Each sample's per-token tensors at its real positions (attention_mask != 0), in order, and the
    first batch's other (non-tensor) keyword arguments."""
    samples: list[dict[str, torch.Tensor]] = []
    shared: dict[str, Any] = {}
    for _, kw in batches:
        shared = shared or {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
        ids = kw["input_ids"]
        mask = kw.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if not isinstance(mask, torch.Tensor) else mask != 0
        per_token = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        samples += [{k: v[i][real[i]] for k, v in per_token.items()} for i in range(ids.shape[0])]
    return samples, shared


def _marks(samples: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(1 if every sample starts with the same token, e.g. [CLS] / <s>; 1 if every one ends with the same, e.g.
    [SEP] / </s>): a tokenizer's added tokens, kept at both ends of a prefix."""
    ids = [s["input_ids"] for s in samples if len(s["input_ids"])]
    same = lambda pos: int(bool(ids) and all(int(x[pos]) == int(ids[0][pos]) for x in ids))  # noqa: E731
    return same(0), same(-1)


def short_prefixes(batches: Iterable[Batch], lengths: tuple[int, ...] = (1, 2, 3, 4)) -> list[Batch]:
    """One short prefix of every calibration sample: sample j keeps its first ``lengths[j % len(lengths)]``
    content tokens, between its start and end tokens when every sample has the same ones (a tokenizer's
    [CLS]/[SEP], <s>/</s>: see :func:`_marks`); samples not longer than that are left out.

    Per-token tensors (``attention_mask``, ``token_type_ids``, ``position_ids``) take the values of the
    sample's first real positions, so a prefix is a single segment whose mask is all ones; the prefixes are
    grouped into one batch per total length, so no batch needs padding. `batches` are token batches
    (:func:`token_batch`) as ``(args, kwargs)``; other keyword arguments come from the first batch.

    >>> ids = torch.tensor([[101, 7, 8, 9, 102], [101, 5, 6, 102, 0]])
    >>> b = short_prefixes([((), {"input_ids": ids, "attention_mask": (ids != 0).long()})], (1, 2))
    >>> [x[1]["input_ids"].tolist() for x in b]
    [[[101, 7, 102]], [[101, 5, 6, 102]]]
    """
    if not lengths or any(k < 1 for k in lengths):
        raise ValueError(f"short_prefixes: lengths must be positive token counts, got {lengths!r}")
    return _prefixes(*_samples(batches), lengths)


def _prefixes(samples: list[dict[str, torch.Tensor]], shared: dict[str, Any], lengths: tuple[int, ...]) -> list[Batch]:
    """:func:`short_prefixes` of samples already cut to their real positions (:func:`_samples`)."""
    start, end = _marks(samples)
    groups: dict[int, list[dict[str, torch.Tensor]]] = {}
    for j, s in enumerate(samples):
        n, k = len(s["input_ids"]), lengths[j % len(lengths)]
        if k >= n - start - end:
            continue  # not shorter than the sample itself
        size = start + k + end
        row = {key: v[:size].clone() for key, v in s.items()}
        if end:
            row["input_ids"][-1] = s["input_ids"][-1]
        groups.setdefault(size, []).append(row)
    return [((), {**shared, **{key: torch.stack([r[key] for r in rows]) for key in rows[0]}})
            for _, rows in sorted(groups.items())]


@torch.no_grad()
def is_causal(model: nn.Module, batch: Batch) -> bool | None:
    """Whether the model's outputs at a sample's first positions ignore the tokens after them (causal: True),
    tested on the first sample of `batch`: its first ``PROBE_TOKENS`` real tokens, and the same with the second
    half's tokens replaced by the first half's (same shapes, so a causal model gives the same first half).

    True when the first half's outputs agree to ``CAUSAL_RTOL`` of their largest magnitude (a bidirectional
    encoder, even a random one, differs by far more); None when it cannot tell: a sample of fewer than 2
    tokens or whose change leaves it the same, an output without a (1, T, ...) float tensor first (an
    encoder-decoder's), or a failed forward.

    >>> is_causal(llama, batch), is_causal(bert, batch)
    (True, False)
    """
    samples, shared = _samples([batch])
    s = {k: v[:PROBE_TOKENS][None] for k, v in samples[0].items()}
    n = s["input_ids"].shape[1]
    k = n // 2
    other = s["input_ids"].clone()
    other[:, k:2 * k] = s["input_ids"][:, :k]
    if n < 2 or torch.equal(other, s["input_ids"]):
        return None
    dev = model_device(model)
    try:
        with eval_mode(model):  # dropout would make any model look bidirectional
            a, b = (first_tensor(model(**shared, **move_to({**s, "input_ids": ids}, dev)))
                    for ids in (s["input_ids"], other))
    except Exception as e:  # noqa: BLE001 - the probe only decides whether to add data: say why it could not
        log.info("is_causal: the probe forward failed (%s: %s)", type(e).__name__, e)
        return None
    if (a is None or b is None or a.dim() < 2 or tuple(a.shape[:2]) != (1, n) or a.shape != b.shape
            or not a.is_floating_point()):
        return None
    scale = float(a[:, :k].abs().max()) or 1.0
    return float((a[:, :k] - b[:, :k]).abs().max()) <= CAUSAL_RTOL * scale


def mix_lengths(model: nn.Module, calib: Any, options: CalibOptions) -> tuple[Any, list[str]]:
    """:func:`mix_calibration` without the regime labels: (data, notes).

    >>> calib, notes = mix_lengths(bert, batches, CalibOptions())            # + prefixes + vocabulary singles
    >>> mix_lengths(bert, batches, CalibOptions(short_prefixes=(), vocab_inputs=0))[1]   # off: no change
    []
    """
    data, _, notes = mix_calibration(model, calib, options)
    return data, notes


def _pad_ids(batches: Iterable[Batch]) -> set[int]:
    """The token ids at padding positions (attention_mask == 0) of token batches."""
    out: set[int] = set()
    for _, kw in batches:
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            out.update(int(x) for x in kw["input_ids"][mask == 0].unique())
    return out


def mix_calibration(model: nn.Module, calib: Any, options: CalibOptions) -> tuple[Any, list[int] | None, list[str]]:
    """The calibration data with, for a bidirectional model (:func:`is_causal` is False) calibrated on token
    batches only, ``short_prefixes(options.short_prefixes)`` of its samples and ``options.vocab_inputs``
    single-token inputs of its vocabulary (:func:`~brainsurgeon.calib.vocab.vocab_singles`) appended; else
    `calib` as it is. Returns (data, labels, notes): labels[i] is batch i's regime (0 samples, 1 prefixes,
    2 vocabulary; ``calib.regimes``) when anything was added, else None;
    a note whenever token batches are seen (what was added, or why nothing). The result holds the first
    ``options.max_batches`` batches and then the additions (read it with no limit).

    >>> calib, labels, notes = mix_calibration(bert, batches, CalibOptions())   # labels [0, 0, 1, 1, 2, 2, 2, 2]
    """
    lengths, n_vocab = options.short_prefixes, options.vocab_inputs
    if (lengths or n_vocab) and is_one_shot(calib):
        calib = cache_batches(calib, options.max_batches)  # peeking at the first batch must not consume it
    if not (lengths or n_vocab) or not token_batch(next(iter(iter_batches(calib, 1)))):
        return calib, None, []
    batches = cache_batches(calib, options.max_batches)
    what = "short prefixes or vocabulary singles"
    off = "CalibOptions(short_prefixes=(), vocab_inputs=0) turns this off"
    if not all(token_batch(b) for b in batches):
        return calib, None, [f"calibration length mix: not every calibration batch is a tokenizer dict like the "
                             f"first (2-D integer input_ids, per-token tensors only); no {what} added"]
    causal = is_causal(model, batches[0])
    if causal is None:
        return calib, None, [f"calibration length mix: could not tell whether the model is causal (the probe on "
                             f"the first sample's first tokens gave no (1, T, ...) output to compare, or failed); "
                             f"no {what} added"]
    if causal:
        return calib, None, [f"calibration length mix: the model is causal (its outputs at a sample's first "
                             f"positions do not depend on the tokens after them), so short prefixes would only "
                             f"repeat rows the Hessians already have; no {what} added"]
    samples, shared = _samples(batches)
    start, end = _marks(samples)
    prefixes = _prefixes(samples, shared, lengths) if lengths else []
    first = samples[0]["input_ids"] if samples else torch.zeros(0, dtype=torch.long)
    exclude = _pad_ids(batches) | ({int(first[0])} if start else set()) | ({int(first[-1])} if end else set())
    ids = vocab_ids(model, n_vocab, options.vocab_seed, exclude)
    singles = vocab_singles(samples, shared, ids, (start, end))
    real = sum(len(s["input_ids"]) for s in samples)
    notes = []
    if prefixes:
        rows = sum(b[1]["input_ids"].numel() for b in prefixes)
        ends = " and ".join(w for w, on in (("start", start), ("end", end)) if on) or "no"
        notes.append(f"calibration length mix: the model is bidirectional (its outputs at a sample's first "
                     f"positions change with the tokens after them), so short inputs put its layers in a regime "
                     f"the calibration samples never show; added "
                     f"{sum(len(b[1]['input_ids']) for b in prefixes)} short prefixes of the calibration samples "
                     f"({'/'.join(map(str, lengths))} content tokens, {ends} token kept; {rows} tokens beside the "
                     f"samples' {real}) in {len(prefixes)} unpadded batch(es); {off}")
    if n_vocab:
        V = vocab_size(model)
        notes.append(
            f"calibration vocabulary: added {len(ids)} single-token inputs of the model's vocabulary (seed "
            f"{options.vocab_seed}, drawn from its {V} input-embedding rows less {len(special_ids(model, exclude))} "
            f"special/start/end/padding ids), each between the samples' start/end tokens, so the Hessians see "
            f"token identities the calibration samples never show ({sum(b[1]['input_ids'].numel() for b in singles)} "
            f"tokens); CalibOptions(vocab_inputs=0) turns this off" if singles else
            "calibration vocabulary: no single-token inputs added: "
            + ("the model has no input embedding (get_input_embeddings()) to draw from" if V is None else
               "the first calibration sample is too short to give a single input its start/end tokens"))
    extra = prefixes + singles
    if not extra:
        return calib, None, notes
    labels = [0] * len(batches) + [1] * len(prefixes) + [2] * len(singles)
    if options.regime_shares:
        present = sorted(set(labels))
        total = sum(options.regime_shares[r] for r in present)
        notes.append("calibration regimes: each Hessian's trace split " + ", ".join(
            f"{options.regime_shares[r] / total:.0%} {REGIMES[r]}" for r in present)
            + " (CalibOptions.regime_shares; () counts every token alike)")
        # held-out singles (GPTQ's guard): forwarded last, share 0, so in no H (calib.heldout captures them)
        n_held = options.heldout_singles
        held = vocab_singles(samples, shared, heldout_ids(model, n_held, options.vocab_seed, exclude, ids),
                             (start, end)) if n_held else []
        extra, labels = extra + held, labels + [HELDOUT] * len(held)
    return CachedBatches(list(batches) + extra), labels, notes
