"""The per-layer database of compressed variants: safetensors shards + a JSON manifest, resumable.

Every entry is one (model hash, layer, method, level, calibration hash): the compressed weight
(a shard ``shards/<key>.safetensors``), its OBS layer loss tr(dW H dW^T) from
:func:`brainsurgeon.obs.compress_weight`, optionally the measured model-output distortion with
only that layer compressed (OBC, Frantar & Alistarh 2022, sec. 5), and its costs. Each finished
entry is written atomically (shard first, then the manifest), so a killed build restarts where
it stopped; one folder serves many budgets, models and calibration sets.

    >>> table = build_database(model, SearchSpace(), calib, "db/")     # resumes if db/ exists
    >>> table.entries["fc1"][3].variant, table.entries["fc1"][3].score
    ('sp@0.5929', 0.0021)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from .._io import atomic_open
from .._log import get_logger, progress
from ..calib import cache_batches, iter_batches, move_to, supported
from ..calib.data import CachedBatches, model_device
from ..calib.hessian import resolve_layers
from ..calib.mixed import FEED_VERSION, feed_key, mixed_hessians
from ..config import CalibOptions
from ..errors import CalibrationError, ConfigError, FormatError
from .channels import channel_costs, pruned_copy
from .config import SearchSpace
from .costs import LayerProfile, profile_layers, variant_costs
from .damage import OutputDamage
from .executors import InlineExecutor, make_executor
from .factored import factorizable, factorized_module, lowrank_costs, separable_module
from .latency import LatencyTable
from .solve import layer_weight, solve_variant
from .variants import Variant, layer_variants

log = get_logger(__name__)
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One database row: a layer variant, its losses and its costs (all measured)."""

    key: str
    model_hash: str
    calib_hash: str
    layer: str
    variant: str
    configs: tuple[dict[str, Any], ...]
    sparsity: float
    bits: int
    loss: float  # tr(dW H dW^T)
    rel_loss: float  # loss / tr(W H W^T)
    model_loss: float | None  # output distortion with only this layer compressed
    costs: dict[str, float] = field(default_factory=dict)
    shard: str = ""  # "" for the dense variant (the model's own weight)
    seconds: float = 0.0

    @property
    def structural(self) -> bool:
        """A channel variant: applied by physical removal (``prune_``), no shard."""
        return self.variant.startswith("ch@")

    @property
    def score(self) -> float:
        """What the solvers minimise: the model loss if measured, else the relative OBS loss."""
        return self.rel_loss if self.model_loss is None else self.model_loss

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Entry:
        return Entry(**{**d, "configs": tuple(d["configs"])})


def tensor_hash(tensors: list[torch.Tensor], extra: str = "") -> str:
    """sha256 over shapes, dtypes and bytes of `tensors` (first 16 hex digits)."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_hash(model: nn.Module) -> str:
    """Hash of the model's type, state_dict names, shapes and values."""
    sd = model.state_dict()
    return tensor_hash(list(sd.values()), type(model).__name__ + "|" + ",".join(sd))


def calib_hash(batches: list[Any], options: CalibOptions | None = None) -> str:
    """Hash of every tensor of the (args, kwargs) calibration batches and of what else decides the Hessians
    built from them: the calibration feed's version and the CalibOptions it reads (``calib.mixed.feed_key``).

    >>> calib_hash(batches) != calib_hash(batches, CalibOptions(vocab_inputs=0))
    True
    """
    ts = [t for args, kw in batches for t in [*args, *kw.values()] if isinstance(t, torch.Tensor)]
    return tensor_hash(ts, "calib|" + feed_key(options or CalibOptions()))


def entry_key(mhash: str, layer: str, variant: Variant, chash: str) -> str:
    """The manifest key of (model hash, layer, method configs, level, calibration hash)."""
    text = json.dumps([mhash, layer, [c.to_dict() for c in variant.configs], variant.name, chash], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Database:
    """A folder with ``manifest.json`` and ``shards/``; entries of any model and calibration set.

    >>> db = Database("db/")
    >>> len(db.entries), db.weight(db.entries[key]).shape
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.path = self.root / "manifest.json"
        self.entries: dict[str, Entry] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") != MANIFEST_VERSION:
                    raise ValueError(f"manifest version {data.get('version')!r}, expected {MANIFEST_VERSION}")
                self.entries = {k: Entry.from_dict(v) for k, v in data["entries"].items()}
            except (ValueError, KeyError, TypeError) as e:
                raise FormatError(f"search database {self.path} is corrupt ({e}); delete the folder "
                                  f"{self.root} (or pass another db path) to rebuild it") from e
        lost = [k for k, e in self.entries.items() if e.shard and not (self.root / e.shard).is_file()]
        for k in lost:  # a shard removed by hand: recompute that entry
            log.warning("search database %s: shard %s is missing; entry will be recomputed", self.root, k)
            del self.entries[k]

    def add(self, entry: Entry, weight: torch.Tensor | None) -> None:
        """Write the shard (if any), then the manifest, each atomically."""
        if weight is not None:
            with atomic_open(self.root / entry.shard, "wb") as f:
                f.write(save({"weight": weight.detach().cpu().contiguous()}))
        self.entries[entry.key] = entry
        with atomic_open(self.path, "w") as f:
            json.dump({"version": MANIFEST_VERSION,
                       "entries": {k: asdict(e) for k, e in self.entries.items()}}, f, indent=1)

    def weight(self, entry: Entry) -> torch.Tensor:
        """The compressed weight of `entry` (CPU); not defined for the dense variant."""
        if not entry.shard:
            raise ConfigError(f"entry {entry.layer}/{entry.variant} is the dense variant: it has no shard")
        try:
            return load_file(self.root / entry.shard)["weight"]
        except (OSError, KeyError, RuntimeError) as e:
            raise FormatError(f"shard {self.root / entry.shard} of {entry.layer}/{entry.variant} cannot be "
                              f"read ({e}); delete it and rebuild the database to recompute it") from e


@dataclass
class SearchTable:
    """The database rows of one model and calibration set, per searched layer, plus the costs model.

    layers: searched layers in model order; skipped: supported layers kept dense (their cost is fixed).
    """

    db: Database
    layers: list[str]
    entries: dict[str, list[Entry]]
    profiles: dict[str, LayerProfile]
    skipped: list[str]
    act_bits: int
    computed: int = 0  # entries solved by this build (0 when everything was already stored)

    def dense_total(self, metric: str) -> float:
        """The dense model's cost (every supported layer, float32)."""
        return sum(p.dense_costs(self.act_bits)[metric] for p in self.profiles.values())

    def fixed_cost(self, metric: str) -> float:
        """Cost of the skipped layers (always dense)."""
        return sum(self.profiles[n].dense_costs(self.act_bits)[metric] for n in self.skipped)

    def only(self, variants: tuple[str, ...]) -> SearchTable:
        """This table with each layer's entries cut to the named variants (e.g. OBC's joint space
        ``("8w8a", "4w4a", "2:4+8w8a", "2:4+4w4a")``, without the dense one); every layer must keep one.

        >>> table.only(("8w8a", "4w4a")).entries["fc1"][0].variant
        '8w8a'
        """
        entries = {n: [e for e in es if e.variant in variants] for n, es in self.entries.items()}
        empty = [n for n in self.layers if not entries[n]]
        if empty:
            raise ConfigError(f"SearchTable.only({list(variants)}): layers {empty} have none of these variants "
                              f"(they have {[e.variant for e in self.entries[empty[0]]]}); name one they have, "
                              f"or ignore those layers in the SearchSpace")
        return dataclasses.replace(self, entries=entries)


def _searched_layers(model: nn.Module, space: SearchSpace) -> tuple[list[str], list[str]]:
    ign = [re.compile(p) for p in space.ignore]
    names = [n for n, m in model.named_modules() if n and supported(m)]
    keep = [n for n in names if not any(p.fullmatch(n) for p in ign)]
    if not keep:
        raise ConfigError(f"SearchSpace.ignore={list(space.ignore)} leaves no layer of {type(model).__name__} "
                          f"to search; loosen ignore")
    return keep, [n for n in names if n not in keep]


def _grouped_channels(module: nn.Module) -> int:
    W = layer_weight(module)
    return int(W.shape[1]) if W.dim() > 1 else 1


def _hessians(model: nn.Module, names: list[str], batches: list[Any], options: CalibOptions) -> dict[str, torch.Tensor]:
    """The dense model's Hessians of `names`, fed as the driver feeds them (``calib.mixed``); notes logged."""
    Hs, notes = mixed_hessians(model, resolve_layers(model, names), CachedBatches(batches), options)
    for note in notes:
        log.info("search database: %s", note)
    return Hs


def _act_quantized(model: nn.Module, space: SearchSpace, bits: list[int], layers: list[str],
                   batches: list[Any], options: CalibOptions
                   ) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, nn.Module]]]:
    """Per activation bit width: the Hessians of the layers' quantized inputs (every supported layer's
    input quantized, static per tensor, calibrated on `batches`) and each layer's input quantizer."""
    from ..config import ActQuant
    from ..quant.act import insert_act_quant_

    out = {}
    for a in bits:
        qm = copy.deepcopy(model)
        names = [n for n, m in qm.named_modules() if n and supported(m)]
        insert_act_quant_(qm, {n: ActQuant(bits=a, observer=space.act_observer) for n in names}, batches)
        out[a] = (_hessians(qm, layers, batches, options), {n: qm.get_submodule(n).input_quantizer for n in layers})
    return out


def build_database(model: nn.Module, space: SearchSpace, calib: Any, root: str | os.PathLike[str],
                   executor: str | Executor = "inline", workers: int = 2, *,
                   options: CalibOptions | None = None) -> SearchTable:
    """Compute (or resume) every variant of every searched layer; return this model's table.

    Hessians come from the dense model (OBC style), one pass over `calib` fed as the compression
    driver feeds it (``calib.mixed``: padding left out; an encoder's length and vocabulary mix as
    `options` say, default ``CalibOptions()``; the first ``options.max_batches`` batches). Entries
    already in the manifest for the same (model, layer, configs, level, calibration data and feed)
    are reused, not solved again; entries built under other calibration data or options (or by an
    older feed) are not matched and are recomputed (logged). The model is not modified (losses are
    measured on a private copy).

    >>> table = build_database(model, SearchSpace(levels=6), calib, "db/", executor="process")
    >>> table.computed        # 0 on a second call: everything is read back
    0
    """
    options = options or CalibOptions()
    batches = cache_batches(calib, options.max_batches)
    if not batches:
        raise CalibrationError("build_database: calibration data is empty")
    dev = model_device(model)
    batches = type(batches)(move_to(b, dev) for b in batches)
    names, skipped = _searched_layers(model, space)
    all_names = [n for n, m in model.named_modules() if n and supported(m)]
    args, kwargs = batches[0]  # costs are per sample: the first sample of the first batch
    one = (args[0][:1],) if args else {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    profiles = profile_layers(model, all_names, one)
    mhash, chash = model_hash(model), calib_hash(batches, options)
    db = Database(root)
    other = sum(e.model_hash == mhash and e.calib_hash != chash and e.layer in names for e in db.entries.values())
    if other:
        log.info("search database %s: %d stored entries of this model were built from other calibration data or "
                 "CalibOptions (or an older calibration feed than v%d) and are not reused", root, other, FEED_VERSION)
    modules = dict(model.named_modules())
    todo: list[tuple[str, Variant, str]] = []
    variants: dict[str, list[tuple[Variant, str]]] = {}
    for n in names:
        mod = modules[n]
        matrix = (profiles[n].rows, profiles[n].cols) if factorizable(mod) else None
        vs = layer_variants(space, _grouped_channels(mod), matrix, mod)
        variants[n] = [(v, entry_key(mhash, n, v, chash)) for v in vs]
        todo += [(n, v, k) for v, k in variants[n] if k not in db.entries]
    log.info("search database %s: %d of %d entries to compute", root, len(todo),
             sum(len(v) for v in variants.values()))
    if todo:
        _compute(model, space, list(iter_batches(batches)), db, todo, profiles, (mhash, chash), executor, workers,
                 one, options)
    table = SearchTable(db, names, {n: [db.entries[k] for _, k in variants[n]] for n in names}, profiles,
                        skipped, space.act_bits, computed=len(todo))
    return table


def _compute(model: nn.Module, space: SearchSpace, batches: list[Any], db: Database,
             todo: list[tuple[str, Variant, str]], profiles: dict[str, LayerProfile], hashes: tuple[str, str],
             executor: str | Executor, workers: int, example: Any, options: CalibOptions) -> None:
    mhash, chash = hashes
    layers = sorted({n for n, v, _ in todo if v.pattern != "channels"}, key=list(profiles).index)
    Hs = _hessians(model, layers, batches, options) if layers else {}
    act = _act_quantized(model, space, sorted({v.act_bits for _, v, _ in todo if v.act_bits < 32}), layers, batches,
                         options)
    modules = dict(model.named_modules())
    distortion = (OutputDamage(model, CachedBatches(batches[: space.model_loss_batches]), "mse")
                  if space.model_loss else None)
    latency = LatencyTable(db.root, model_device(model) or "cpu") if space.latency else None
    ex = make_executor(executor, workers)
    inline = isinstance(ex, InlineExecutor)
    window = 1 if inline else 2 * workers

    def finish(fut: Future, layer: str, v: Variant, key: str) -> None:
        W_hat, loss, rel, sec = fut.result()
        prof, mod = profiles[layer], modules[layer]
        if v.pattern == "lowrank":  # the costs of the real factorized module
            costs = lowrank_costs(prof, factorized_module(mod, W_hat, v.configs[0].rank), space.act_bits)
        elif v.pattern == "separable":  # the costs of the real compact module
            costs = lowrank_costs(prof, separable_module(mod, W_hat, v.configs[0]), space.act_bits)
        else:
            costs = variant_costs(prof, W_hat, v, space.act_bits)
        if latency is not None:
            costs["latency"] = latency.measure(f"{mhash}|{layer}|{v.name}", mod, W_hat, v, prof.input_shape)
        quant_in = act[v.act_bits][1][layer] if v.act_bits < 32 else None
        mloss = None if distortion is None else (
            0.0 if not v.configs else distortion.layer_damage(layer, W_hat, quant_in))
        shard = f"shards/{key}.safetensors" if v.configs else ""
        db.add(Entry(key, mhash, chash, layer, v.name, tuple(c.to_dict() for c in v.configs), v.sparsity,
                     v.bits, loss, rel, mloss, costs, shard, sec), W_hat if v.configs else None)

    def channel_entry(layer: str, v: Variant, key: str) -> None:
        t0 = time.perf_counter()
        pruned = pruned_copy(model, layer, v.configs[0], example, batches, list(profiles))
        costs = channel_costs(profiles, pruned, layer, example, space.act_bits)
        mloss = distortion.model_damage(pruned) if distortion is not None else None
        db.add(Entry(key, mhash, chash, layer, v.name, tuple(c.to_dict() for c in v.configs), v.sparsity, 32,
                     math.nan, math.nan, mloss, costs, "", time.perf_counter() - t0), None)

    pending: dict[Future, tuple[str, Variant, str]] = {}
    try:
        for layer, v, key in progress(todo, desc="database"):
            if v.pattern == "channels":  # structural: runs here, on a private copy of the model
                channel_entry(layer, v, key)
                continue
            W = layer_weight(modules[layer])
            H = Hs[layer] if v.act_bits == 32 else act[v.act_bits][0][layer]
            if not inline:
                W, H = W.cpu(), H.cpu()
            pending[ex.submit(solve_variant, W, H, v.configs, layer)] = (layer, v, key)
            while len(pending) >= window:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    finish(fut, *pending.pop(fut))
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(fut, *pending.pop(fut))
    finally:
        if isinstance(executor, str) and not inline:  # an Executor passed in belongs to the caller
            ex.shutdown(wait=True, cancel_futures=True)
