"""Per-entry model damage: the output KL (or distortion) with only one layer compressed, cached.

OBC (Frantar & Alistarh, NeurIPS 2022, sec. 5) scores each database entry by the model's loss
with only that layer compressed. :func:`score_table` measures it on any calibration set (it can
differ from the Hessians' set, and be larger than the build's) and keeps it in the database
folder (``scores.json``, written atomically, resumable), keyed by (entry, calibration, metric).

metric: ``"kl"`` or ``"mse"`` (:mod:`.damage`). ``per="layer"`` measures one entry per layer
only (its most damaging one) and scales the OBS losses of the others by that layer's ratio
damage / tr(dW H dW^T): a score comparable across layers at 1/k of the forwards (k variants
per layer).

    >>> table = build_database(model, space, calib, "db/")
    >>> table = score_table(model, table, more_calib, metric="kl")       # every entry, cached
    >>> dp_plan(table, Budget.parse("bops=8x"))
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from .._io import atomic_open
from .._log import get_logger, progress
from ..calib import cache_batches
from ..errors import ConfigError
from .damage import OutputDamage
from .database import Entry, SearchTable, calib_hash

log = get_logger(__name__)


def score_table(model: nn.Module, table: SearchTable, calib: Any, metric: str = "kl", per: str = "entry",
                max_batches: int = 0) -> SearchTable:
    """The table with every entry's ``model_loss`` measured as `metric` on `calib` (see the module doc).

    Cached in ``<db>/scores.json`` by (entry key, calibration hash, metric, per); a second call
    measures nothing. The model is not modified.

    >>> t2 = score_table(model, table, calib, metric="kl", per="layer")
    >>> t2.entries["fc1"][3].score > 0
    True
    """
    if per not in ("entry", "layer"):
        raise ConfigError(f"score_table: per must be 'entry' or 'layer', got {per!r}")
    if any(e.structural for es in table.entries.values() for e in es):
        raise ConfigError("score_table: channel tables are already scored by the model loss of the pruned copy "
                          "(structural entries have no stored weight to swap in); use the table as built")
    batches = cache_batches(calib, max_batches)
    tag = f"{calib_hash(batches)}|{metric}|{per}"
    path = table.db.root / "scores.json"
    cache: dict[str, float] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    todo = [n for n in table.layers if any(f"{e.key}|{tag}" not in cache for e in table.entries[n] if e.shard)]
    if todo:
        dmg = OutputDamage(model, batches, metric)
        for n in progress(todo, desc=f"scores ({metric}, per {per})"):
            cache.update(_score_layer(dmg, table, n, per, tag))
            with atomic_open(path, "w") as f:
                json.dump(cache, f, indent=0)
        log.info("scored %d layers (%s, per %s) on %d batches", len(todo), metric, per, len(batches))
    entries = {n: [dataclasses.replace(e, model_loss=cache[f"{e.key}|{tag}"] if e.shard else 0.0)
                   for e in es] for n, es in table.entries.items()}
    return dataclasses.replace(table, entries=entries)


def _score_layer(dmg: OutputDamage, table: SearchTable, name: str, per: str, tag: str) -> dict[str, float]:
    es: list[Entry] = [e for e in table.entries[name] if e.shard]
    if per == "entry":
        return {f"{e.key}|{tag}": dmg.layer_damage(name, table.db.weight(e)) for e in es}
    ref = max(es, key=lambda e: e.loss)
    scale = dmg.layer_damage(name, table.db.weight(ref)) / ref.loss if ref.loss > 0 else 0.0
    return {f"{e.key}|{tag}": scale * e.loss for e in es}
