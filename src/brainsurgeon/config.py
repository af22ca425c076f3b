"""Frozen, validated, versioned configs; the config registry; YAML recipes.

Each method is one frozen dataclass. ``__post_init__`` validates every field and raises
:class:`~brainsurgeon.errors.ConfigError` naming the field, the allowed range and the fix.
Configs round-trip through plain dicts with a type tag and a version::

    >>> cfg = ExactOBS(sparsity=0.75)
    >>> d = cfg.to_dict()          # {'type': 'ExactOBS', 'version': 1, 'sparsity': 0.75, ...}
    >>> assert config_from_dict(d) == cfg

Only registered config types can be loaded from a recipe (an allow-list; YAML is read with
``yaml.safe_load``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

CONFIG_VERSION = 1
RECIPE_VERSION = 1

_REGISTRY: dict[str, type[Config]] = {}


def register_config(cls: type[Config]) -> type[Config]:
    """Class decorator: make `cls` loadable from dicts/recipes under its class name."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a frozen dataclass to be registered")
    own = cls.__post_init__

    def __post_init__(self: Config) -> None:
        try:
            check_field_types(self)  # every registered config: types first, then the class's own ranges
        except ConfigError as type_error:
            field_name = str(type_error).split(".", 1)[1].split(" ", 1)[0]
            try:  # the class's own message also states the allowed range: prefer it when it names the field
                own(self)
            except ConfigError as e:
                if field_name in str(e):
                    raise e from None
            except Exception:  # noqa: BLE001 - the class check choked on the wrong type: the type error says it
                pass
            raise
        own(self)

    cls.__post_init__ = __post_init__  # type: ignore[method-assign]
    _REGISTRY[cls.__name__] = cls
    return cls


_PRIMITIVE_NAMES = {bool: "a bool (True/False)", int: "an integer", float: "a number", str: "a string"}


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(value fits `tp`, the value to store): numpy scalars become Python ones, lists become tuples."""
    import numbers
    import types
    import typing

    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if tp is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, (value if isinstance(value, int | float) else float(value)) if ok else value
    if tp is str:
        return isinstance(value, str), value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return True, value
        for a in args:
            if a is not type(None):
                ok, v = _type_ok(value, a)
                if ok:
                    return ok, v
        return not any(a in _PRIMITIVE_NAMES or a is type(None) for a in args) or value is None, value
    if origin is tuple:
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is str and isinstance(value, str):
            return True, (value,)  # a plain string is one item (one pattern), never its characters
        if not isinstance(value, tuple | list):
            return False, value
        out = []
        for v in value:
            ok, v2 = _type_ok(v, item) if item is not None else (True, v)
            if not ok:
                return False, value
            out.append(v2)
        return True, tuple(tuple(v) if isinstance(v, list) else v for v in out)
    return True, value  # nested configs, dicts: the class checks them itself


def _type_name(tp: Any) -> str:
    import typing

    if tp in _PRIMITIVE_NAMES:
        return _PRIMITIVE_NAMES[tp]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args:
        plural = {bool: "bools", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'pairs' if typing.get_origin(args[0]) is tuple else 'values')}"
    return " or ".join(_type_name(a) if a is not type(None) else "None" for a in args) or str(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def check_field_types(cfg: Config) -> None:
    """Raise ConfigError naming the field and the expected type for every wrongly typed field.

    >>> ExactOBS(sparsity=0.5, damp="0.01")
    ConfigError: ExactOBS.damp must be a number, got '0.01' (str); e.g. damp=0.01
    """
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp = hints.get(f.name)
        if tp is None:
            continue
        ok, stored = _type_ok(value, tp)
        if not ok:
            default = f.default if f.default is not dataclasses.MISSING else None
            eg = f"; e.g. {f.name}={default!r} (the default)" if default is not None else ""
            raise ConfigError(f"{type(cfg).__name__}.{f.name} must be {_type_name(tp)}, got {value!r} "
                              f"({type(value).__name__}){eg}")
        if stored is not value:
            object.__setattr__(cfg, f.name, stored)


def registered_configs() -> list[str]:
    """Names of every registered config type."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Config:
    """Base of all method configs: dict round trip with a type tag and version."""

    verb: ClassVar[str] = ""  # "sparsify" or "quantize": which verb applies this config

    def __post_init__(self) -> None:
        """Validate the fields (subclasses add range checks); registration adds the type checks."""

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe dict with ``type`` and ``version`` keys."""
        d = {"type": type(self).__name__, "version": CONFIG_VERSION}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return d

    def describe(self) -> str:
        """A short human label for tables, e.g. ``ExactOBS 75% unstructured``."""
        return type(self).__name__


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a config from :meth:`Config.to_dict` output (only registered types)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ConfigError(f"a method config must be a mapping with a 'type' key, got {d!r}; "
                          f"e.g. {{type: ExactOBS, sparsity: 0.5}}")
    d = dict(d)
    name = d.pop("type")
    version = d.pop("version", CONFIG_VERSION)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown config type {name!r}; registered: {registered_configs()}. "
                          f"Add one with @register_config on a frozen dataclass")
    if version != CONFIG_VERSION:
        raise ConfigError(f"{name}: config version {version} is not supported (this brainsurgeon "
                          f"reads version {CONFIG_VERSION}); re-export the recipe")
    cls = _REGISTRY[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**d)


# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: ``unstructured``, ``N:M`` (N kept of every M) or ``block{c}``.

    >>> Pattern.parse("2:4").n, Pattern.parse("2:4").m
    (2, 4)
    """

    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0
    m: int = 0
    block: int = 1

    @staticmethod
    def parse(text: str) -> Pattern:
        if text == "unstructured":
            return Pattern("unstructured")
        if mt := re.fullmatch(r"(\d+):(\d+)", text):
            n, m = int(mt.group(1)), int(mt.group(2))
            if not 0 < n < m:
                raise ConfigError(f"pattern {text!r}: N:M needs 0 < N < M (N weights kept of every M), "
                                  f"got N={n}, M={m}; e.g. '2:4'")
            return Pattern("nm", n=n, m=m)
        if mt := re.fullmatch(r"block(\d+)", text):
            c = int(mt.group(1))
            if c < 1:
                raise ConfigError(f"pattern {text!r}: block size must be >= 1, e.g. 'block4'")
            return Pattern("block", block=c)
        raise ConfigError(f"unknown sparsity pattern {text!r}; use 'unstructured', 'N:M' "
                          f"(e.g. '2:4') or 'block{{c}}' (e.g. 'block4')")

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def _check(cond: bool, cls: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}: {msg}")


@dataclass(frozen=True)
class _PruneConfig(Config):
    """Shared fields of the pruning configs."""

    verb: ClassVar[str] = "sparsify"
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm", "block")

    sparsity: float | None = None
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        name = type(self).__name__
        pat = Pattern.parse(self.pattern)
        _check(pat.kind in self.patterns, name,
               f"pattern {self.pattern!r} is not supported; supported kinds: {list(self.patterns)}")
        if pat.kind == "nm":
            _check(self.sparsity is None or abs(self.sparsity - pat.sparsity) < 1e-9, name,
                   f"sparsity={self.sparsity} contradicts pattern {self.pattern!r} "
                   f"(which means {pat.sparsity:g}); leave sparsity unset for N:M")
        else:
            _check(self.sparsity is not None, name,
                   f"sparsity is required for pattern {self.pattern!r}, e.g. sparsity=0.5")
            _check(isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0, name,
                   f"sparsity must be in [0, 1), got {self.sparsity!r}")

    @property
    def parsed(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The fraction of weights removed (from the pattern for N:M)."""
        s = self.parsed.sparsity
        return float(self.sparsity if s is None else s)

    def describe(self) -> str:
        if self.parsed.kind == "nm":
            return f"{type(self).__name__} {self.pattern}"
        return f"{type(self).__name__} {self.target_sparsity:.0%} {self.pattern}"


@dataclass(frozen=True)
class _QuantConfig(Config):
    """Shared fields of the quantization configs: the grid."""

    verb: ClassVar[str] = "quantize"

    bits: int = 4
    sym: bool = True
    group_size: int = 0  # 0: one grid per output channel (row)
    mse: bool = True  # shrink search of the min-max range minimising ||w - q(w)||_2.4

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check(isinstance(self.bits, int) and 2 <= self.bits <= 8, name,
               f"bits must be an integer in [2, 8], got {self.bits!r}")
        _check(isinstance(self.group_size, int) and self.group_size >= 0, name,
               f"group_size must be 0 (per output channel) or a positive column count, "
               f"got {self.group_size!r}")

    def describe(self) -> str:
        g = f" g{self.group_size}" if self.group_size else ""
        r = f" +cd{self.refine}" if getattr(self, "refine", 0) else ""
        return f"{type(self).__name__} {self.bits}-bit{g}{'' if self.sym else ' asym'}{r}"


def _check_damp(obj: Any) -> None:
    _check(0.0 <= obj.damp <= 1.0, type(obj).__name__,
           f"damp (relative dampening, fraction of mean diag(H)) must be in [0, 1], got {obj.damp!r}")


@register_config
@dataclass(frozen=True)
class Magnitude(_PruneConfig):
    """Baseline: prune the smallest |w| (per layer; per group for N:M; block L2 norm for blocks)."""


@register_config
@dataclass(frozen=True)
class ExactOBS(_PruneConfig):
    """ExactOBS pruning (Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022).

    Greedy row-wise Optimal Brain Surgeon with a global mask across rows and an exact
    re-solve of each row for its final mask.

    >>> ExactOBS(sparsity=0.75); ExactOBS(pattern="2:4"); ExactOBS(sparsity=0.5, pattern="block4")
    """

    damp: float = 0.01
    lazy: int = 64  # corrections kept as a low-rank factor, folded into H^-1 every `lazy` steps
    row_batch: int = 128  # rows traced together (capped so the workspace stays under ~512 MB)
    dtype: str = "float32"  # precision of the greedy trace; final weights are re-solved in float64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self)
        _check(self.lazy >= 1 and self.row_batch >= 1, "ExactOBS", "lazy and row_batch must be >= 1")
        _check(self.dtype in ("float32", "float64"), "ExactOBS",
               f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


@register_config
@dataclass(frozen=True)
class SparseGPT(_PruneConfig):
    """SparseGPT (Frantar & Alistarh, ICML 2023): one Cholesky pass, adaptive mask per block.

    ``resolve=True`` keeps SparseGPT's mask but re-solves every row exactly for it.
    """

    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")

    blocksize: int = 128
    damp: float = 0.01
    resolve: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self)
        _check(self.blocksize >= 1, "SparseGPT", f"blocksize must be >= 1, got {self.blocksize}")

    def describe(self) -> str:
        return super().describe() + (" +re-solve" if self.resolve else "")


@register_config
@dataclass(frozen=True)
class RTN(_QuantConfig):
    """Baseline: round every weight to the nearest grid point."""


@register_config
@dataclass(frozen=True)
class OBQ(_QuantConfig):
    """OBQ quantization (Frantar & Alistarh, NeurIPS 2022): greedy OBS order per row.

    ``act_order=True`` uses the fixed order of descending diag(H) instead of the greedy
    order; with a shared order the per-row inverses coincide, so this runs the GPTQ solver.
    """

    act_order: bool = False
    damp: float = 0.01
    refine: int = 0  # coordinate-descent passes on the grid after the solve (0 = off)
    lazy: int = 64
    row_batch: int = 128
    dtype: str = "float32"  # precision of the greedy trace

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self)
        _check(self.refine >= 0, "OBQ", f"refine (passes) must be >= 0, got {self.refine}")
        _check(self.dtype in ("float32", "float64"), "OBQ",
               f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


DECOUPLE_AUTO = 50.0  # GPTQ(decouple="auto") on encoders: fixed before its first run (bench/ood_diag.py)
GUARD_SINGLES = 1024  # held-out vocabulary singles for GPTQ(guard="auto") (CalibOptions.heldout_singles)


@register_config
@dataclass(frozen=True)
class GPTQ(_QuantConfig):
    """GPTQ (Frantar et al., ICLR 2023): blocked lazy OBS updates via the Cholesky of H^-1."""

    act_order: bool = True
    blocksize: int = 128
    damp: float = 0.01
    refine: int = 0  # coordinate-descent passes on the grid after the solve (0 = off)
    # H <- (1 - shrink) H + shrink diag(H) before the solve (0 = plain GPTQ, 1 = RTN on the same grid);
    # "auto": Schaefer-Strimmer's intensity estimated per layer from the calibration samples (calib.shrinkage);
    # "heldout": where H is singular (fewer calibration rows than columns) the intensity with the least
    # held-out loss over two folds of the samples (obs.heldout), elsewhere "auto"
    shrink: float | str = "auto"
    # > 0: input columns with H_jj > decouple * median(diag H) (massive activations) are decoupled: their
    # off-diagonal entries of H are zeroed, so they are rounded to nearest and no error is spread onto or
    # from them (obs.hessian.decouple_); 0 = plain GPTQ; "auto": DECOUPLE_AUTO where the calibration driver
    # found the model bidirectional and mixed its calibration (encoders: calib.lengths), 0 elsewhere (causal
    # decoders, CNNs: SmolLM2's massive channels need the compensation, bench/ood_diag.py)
    decouple: float | str = "auto"
    # "auto": where the calibration was mixed (encoders), every row whose error on held-out single-token inputs
    # (GUARD_SINGLES vocabulary ids disjoint from the Hessians', kept out of every H) exceeds round-to-nearest's
    # on the same grid takes the round-to-nearest row (obs.guard); False = off (the default: chosen on MiniLM,
    # it failed its held-out check on all-mpnet-base-v2, SimLex / WS-353 further below RTN; bench/ood_diag.py (8))
    guard: bool | str = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self)
        _check(self.guard == "auto" or self.guard is False, "GPTQ",
               f"guard (round-to-nearest rows where GPTQ's held-out error is larger) must be 'auto' or False, "
               f"got {self.guard!r}")
        number = isinstance(self.decouple, (int, float)) and not isinstance(self.decouple, bool)
        _check(self.decouple == "auto" or (number and (self.decouple == 0.0 or self.decouple >= 1.0)), "GPTQ",
               f"decouple (threshold over the median of diag(H)) must be 'auto', 0 (off) or >= 1, "
               f"got {self.decouple!r}")
        _check(self.shrink in ("auto", "heldout") or (isinstance(self.shrink, (int, float))
                                                     and not isinstance(self.shrink, bool)
                                                     and 0.0 <= self.shrink <= 1.0), "GPTQ",
               f"shrink (Hessian shrinkage toward its diagonal) must be 'auto', 'heldout' or a number in [0, 1], "
               f"got {self.shrink!r}")
        _check(self.refine >= 0, "GPTQ", f"refine (passes) must be >= 0, got {self.refine}")
        _check(self.blocksize >= 1, "GPTQ", f"blocksize must be >= 1, got {self.blocksize}")


ACT_GRANULARITIES = ("tensor", "token", "channel")
ACT_OBSERVERS = ("minmax", "percentile", "mse", "ema")


@register_config
@dataclass(frozen=True)
class ActQuant(Config):
    """Activation quantization at the inputs of Linear/Conv layers (fake-quant; real int8 kernels by
    :func:`brainsurgeon.quant.static.convert_static_int8_`).

    granularity: ``tensor`` (one static scale per layer input), ``channel`` (one static scale per
    input channel) or ``token`` (dynamic: one scale per row, computed at run time).
    observer (static scales, on the calibration data): ``minmax``, ``percentile`` (the
    `percentile`-th and (100 - `percentile`)-th values), ``mse`` (the clipping of the min-max range
    minimising the squared quantization error), ``ema`` (min/max averaged over batches with `ema_decay`).
    In a recipe or with ``quantize_`` it is applied before the weight steps, so their Hessians are
    built from the quantized inputs (OBC's joint setting). smooth: SmoothQuant's alpha (Xiao et al.
    2023), folded into the norms before the Linear layers first (:mod:`brainsurgeon.quant.smooth`).
    equalize: cross-layer equalization's alpha (Nagel et al. 2019) through BatchNorm -> ReLU/ReLU6 ->
    Conv pairs, folded first (:mod:`brainsurgeon.quant.equalize`; the float model is unchanged).

    >>> ActQuant(bits=8); ActQuant(bits=4, observer="mse"); ActQuant(bits=8, granularity="token", sym=True)
    """

    verb: ClassVar[str] = "actquant"

    bits: int = 8
    granularity: str = "tensor"
    observer: str = "minmax"
    sym: bool = False
    percentile: float = 99.99
    ema_decay: float = 0.9
    smooth: float = 0.0  # SmoothQuant migration strength alpha (0 = off), folded into the preceding norms
    equalize: float = 0.0  # cross-layer equalization alpha (0 = off), folded through BN -> act -> conv pairs

    def __post_init__(self) -> None:
        _check(0.0 <= self.equalize <= 1.0, "ActQuant",
               f"equalize (cross-layer equalization alpha; 0 = off) must be in [0, 1], e.g. 0.5, got {self.equalize!r}")
        _check(0.0 <= self.smooth <= 1.0, "ActQuant",
               f"smooth (SmoothQuant alpha; 0 = off) must be in [0, 1], e.g. 0.5, got {self.smooth!r}")
        _check(isinstance(self.bits, int) and 2 <= self.bits <= 8, "ActQuant",
               f"bits must be an integer in [2, 8], got {self.bits!r}")
        _check(self.granularity in ACT_GRANULARITIES, "ActQuant",
               f"granularity must be one of {list(ACT_GRANULARITIES)}, got {self.granularity!r}")
        _check(self.observer in ACT_OBSERVERS, "ActQuant",
               f"observer must be one of {list(ACT_OBSERVERS)}, got {self.observer!r}")
        _check(50.0 < self.percentile <= 100.0, "ActQuant",
               f"percentile must be in (50, 100], e.g. 99.99, got {self.percentile!r}")
        _check(0.0 <= self.ema_decay < 1.0, "ActQuant", f"ema_decay must be in [0, 1), got {self.ema_decay!r}")

    @property
    def dynamic(self) -> bool:
        """Per-token scales are computed at run time (no calibration)."""
        return self.granularity == "token"

    def describe(self) -> str:
        obs = "dynamic" if self.dynamic else self.observer
        sq = f" +SmoothQuant {self.smooth:g}" if self.smooth else ""
        sq += f" +CLE {self.equalize:g}" if self.equalize else ""
        return f"ActQuant a{self.bits} {self.granularity} {obs}{' sym' if self.sym else ''}{sq}"


@register_config
@dataclass(frozen=True)
class CalibOptions(Config):
    """How calibration runs and what is re-calibrated afterwards.

    mode: ``sequential`` (GPTQ style: each layer sees the already-compressed layers' outputs)
    or ``dense`` (OBC style: every Hessian from the dense model).
    hessian_dtype: accumulation precision of H (float32: half the memory and time; solvers
    factor it in float64). true_sequential: in block mode, calibrate the layers of a block group
    by group (q/k/v, then o, ...), each on inputs through the already-compressed earlier groups,
    at one block forward per group; the default takes every Hessian of a block from one forward.
    strict: refuse the run when a layer cannot take the step's N:M / block pattern (input columns
    per group not divisible by M: depthwise convs, RGB stems); the default keeps such a layer
    dense with a note in the report. keep_head: leave the model's output layer dense (HF
    ``get_output_embeddings()``, e.g. lm_head, else the last Linear: the classifier), as
    llm-compressor and GPTQ tools do (an override naming it still compresses it); the default
    compresses it, with a note naming it. short_prefixes: for a bidirectional model (an encoder: BERT,
    MPNet; detected by a probe, causal decoders never) calibrated on tokenizer batches, add one short
    prefix of every calibration sample, with these many content tokens in turn (start/end tokens kept),
    so the Hessians also see the short-input regime (single words, queries) that sentences never show
    (``calib.lengths``; a note says what was added); () = the calibration data as given.
    vocab_inputs: for such a model, also add this many single-token inputs ``[start] t [end]`` of tokens
    drawn (seed ``vocab_seed``, special tokens left out) from the model's input embedding rows, so the
    Hessians see token identities the calibration text never shows (``calib.vocab``; no data); 0 = none.
    regime_shares: the share of every Hessian's trace given to (calibration samples, short prefixes,
    vocabulary singles), renormalised over those present (``calib.regimes``), so neither kind drowns the
    other; () = every token row counts alike.
    heldout_singles: this many more single-token inputs of vocabulary ids disjoint from those, forwarded
    last with a share of 0 (in no Hessian: ``calib.heldout``) for GPTQ's guard; ``quantize_`` sets it to
    ``GUARD_SINGLES`` when a GPTQ layer has ``guard="auto"``; needs regime_shares; 0 = none.
    """

    mode: str = "sequential"
    max_batches: int = 0  # 0: all batches
    hessian_dtype: str = "float32"
    blocks: str = ""  # dotted path of a ModuleList of blocks (e.g. "model.layers"); "" = per layer
    offload: bool = False  # keep only the current block on the compute device
    bn_reestimate: bool = False
    correct_mean_std: bool = False
    true_sequential: bool = False
    strict: bool = False  # refuse instead of skipping layers the sparsity pattern cannot divide
    keep_head: bool = False  # True: the output layer (lm_head / classifier) stays dense
    # sequential mode: most MB of cached chain activations to replay (peak about twice that while a
    # child maps them); past it the chain's layers use forwards from the model input (noted), 0 = never replay
    replay_cache_mb: float = 1024.0
    short_prefixes: tuple[int, ...] = (1, 2, 3, 4)  # content tokens of the prefixes added for encoders; () = off
    vocab_inputs: int = 1024  # single-token vocabulary inputs added for encoders; 0 = off
    vocab_seed: int = 0
    regime_shares: tuple[float, ...] = (0.5, 0.25, 0.25)  # trace shares: samples, prefixes, vocabulary; () = by rows
    # held-out single-token inputs forwarded with the mix but kept out of every H (regime 3, calib.heldout), for
    # GPTQ(guard="auto"), which sets it (GUARD_SINGLES); needs regime_shares; 0 = none
    heldout_singles: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in ("sequential", "dense"), "CalibOptions",
               f"mode must be 'sequential' or 'dense', got {self.mode!r}")
        _check(self.hessian_dtype in ("float32", "float64"), "CalibOptions",
               f"hessian_dtype must be 'float32' or 'float64', got {self.hessian_dtype!r}")
        _check(self.max_batches >= 0, "CalibOptions", "max_batches must be >= 0 (0 = all)")
        _check(self.blocks == "" or re.fullmatch(r"\w+(\.\w+)*", self.blocks) is not None, "CalibOptions",
               f"blocks must be '' (per-layer calibration) or the dotted path of the model's ModuleList of blocks, "
               f"e.g. 'model.layers' (Llama) or 'encoder.layer' (BERT), got {self.blocks!r}; pass the path as "
               f"model.get_submodule() takes it, without spaces or empty parts")
        _check(math.isfinite(self.replay_cache_mb) and self.replay_cache_mb >= 0, "CalibOptions",
               f"replay_cache_mb must be a finite number of MB >= 0 (0 = never replay), got {self.replay_cache_mb!r}")
        _check(all(k >= 1 for k in self.short_prefixes), "CalibOptions",
               f"short_prefixes must be token counts >= 1 (e.g. (1, 2, 3, 4)) or () for none, "
               f"got {self.short_prefixes!r}")
        _check(self.heldout_singles >= 0, "CalibOptions",
               f"heldout_singles must be a count of single-token inputs >= 0 (0 = none), got {self.heldout_singles!r}")
        _check(self.vocab_inputs >= 0, "CalibOptions",
               f"vocab_inputs must be a count of single-token inputs >= 0 (0 = none), got {self.vocab_inputs!r}")
        _check(self.regime_shares == () or (len(self.regime_shares) == 3 and all(
            math.isfinite(x) and x >= 0 for x in self.regime_shares) and self.regime_shares[0] > 0), "CalibOptions",
               f"regime_shares must be 3 finite shares >= 0 of H's trace for (calibration samples, short prefixes, "
               f"vocabulary singles), the first > 0, e.g. (0.5, 0.25, 0.25), or () to count every token alike, "
               f"got {self.regime_shares!r}")


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Step:
    """One step of a recipe: a verb's config, layers to skip, per-layer overrides.

    ``overrides`` is an ordered tuple of (name regex, config): the first full match wins;
    the same format the budget search emits.
    """

    method: Config
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Config], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.method, Config):
            raise ConfigError(f"a recipe step's method must be a config (e.g. ExactOBS(sparsity=0.5)), "
                              f"got {self.method!r}")
        object.__setattr__(self, "ignore", as_patterns(self.ignore))
        object.__setattr__(self, "overrides", _as_overrides(self.overrides))
        compile_patterns(self.ignore)
        compile_patterns([p for p, _ in self.overrides], what="overrides")
        for pat, cfg in self.overrides:
            if type(cfg).verb != type(self.method).verb:
                raise ConfigError(f"override {pat!r}: {type(cfg).__name__} is a {type(cfg).verb} "
                                  f"config but the step is {type(self.method).verb}")


def as_patterns(patterns: Any, what: str = "ignore") -> tuple[str, ...]:
    """Module-name regexes as a tuple: a plain string is ONE pattern (never its characters).

    >>> as_patterns("fc1"), as_patterns(["fc.*", "conv1"])
    (('fc1',), ('fc.*', 'conv1'))
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    if isinstance(patterns, dict) or not isinstance(patterns, Iterable):
        raise ConfigError(f"{what} must be a module-name regex or a list of them, got {patterns!r}; "
                          f"e.g. {what}=['fc3'] or {what}='fc.*'")
    out = tuple(patterns)
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"{what}: every pattern must be a string (a module-name regex), got {bad[0]!r}; "
                          f"e.g. {what}=['fc3']")
    return out


def compile_patterns(patterns: Any, known: Iterable[str] | None = None, what: str = "ignore",
                     candidates: Iterable[str] | None = None) -> list[re.Pattern[str]]:
    """Compile module-name regexes (full match); with `known`, each must match one of those names.

    A pattern that matches nothing is almost always a typo that would silently compress the layer
    the user meant to protect, so it is a ConfigError that lists the candidate names.

    >>> compile_patterns(["fc3"], ["conv1", "fc1"])
    ConfigError: ignore pattern 'fc3' matches no module; ... candidates: ['conv1', 'fc1'] ...
    """
    import difflib

    out = []
    for p in as_patterns(patterns, what):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{what} pattern {p!r} is not a valid regular expression ({e}); patterns are "
                              f"full-match Python regexes, e.g. 'fc1' or 'layers\\.[0-3]\\..*'") from e
    if known is not None:
        known = list(known)
        for c in out:
            if not any(c.fullmatch(n) for n in known):
                cands = list(candidates) if candidates is not None else known
                close = difflib.get_close_matches(c.pattern, cands, n=3)
                hint = f"did you mean {close}? " if close else ""
                raise ConfigError(f"{what} pattern {c.pattern!r} matches no module of the model; {hint}"
                                  f"candidates: {cands[:20]}{' ...' if len(cands) > 20 else ''}. Patterns are "
                                  f"full-match regexes (use '{c.pattern}.*' for a prefix)")
    return out


def _as_overrides(overrides: Any) -> tuple[tuple[str, Config], ...]:
    """Per-layer overrides as ((regex, config), ...) from a {regex: config} dict or pairs."""
    if overrides is None:
        return ()
    if isinstance(overrides, dict):
        overrides = overrides.items()
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Iterable):
        raise ConfigError(f"overrides must be an ordered {{regex: config}} dict or (regex, config) pairs, "
                          f"got {overrides!r}; e.g. overrides={{'fc.*': RTN(bits=8)}}")
    out = []
    for item in overrides:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], Config)):
            raise ConfigError(f"overrides: each entry must be (module-name regex, config), got {item!r}; "
                              f"e.g. overrides={{'fc.*': RTN(bits=8)}}")
        out.append((item[0], item[1]))
    return tuple(out)


def match_configs(names: Iterable[str], default: Config, ignore: Iterable[str] = (),
                  overrides: Any = (), known: Iterable[str] | None = None) -> dict[str, Config]:
    """Name -> config for every name that no `ignore` regex fully matches: the config of the first
    override whose regex fully matches the name, else `default`. overrides: an ordered
    {regex: config} dict or (regex, config) pairs (the format recipes and the budget search use).
    Every verb's planner (``api.plan_layers``, ``plan_factorization``, ``plan_sharing``) matches with it.
    A plain string `ignore` is one pattern; every ignore pattern must fully match one of `known`
    (default `names`: pass every module name of the model), else a ConfigError lists the candidates.

    >>> match_configs(["conv1", "fc1", "fc2"], RTN(bits=4), ignore=("fc2",), overrides={"fc.*": RTN(bits=8)})
    {'conv1': RTN(bits=4, ...), 'fc1': RTN(bits=8, ...)}
    """
    names = list(names)
    ign = compile_patterns(ignore, names if known is None else known, "ignore", candidates=names)
    pairs = overrides.items() if isinstance(overrides, dict) else overrides
    over = [(compile_patterns([p], None, "overrides")[0], c) for p, c in pairs]
    return {n: next((c for p, c in over if p.fullmatch(n)), default) for n in names
            if not any(p.fullmatch(n) for p in ign)}


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps plus calibration options. Load with :func:`load_recipe`."""

    steps: tuple[Step, ...]
    calib: CalibOptions = field(default_factory=CalibOptions)

    def to_dict(self) -> dict[str, Any]:
        steps = []
        for s in self.steps:
            d: dict[str, Any] = {"method": s.method.to_dict()}
            if s.ignore:
                d["ignore"] = list(s.ignore)
            if s.overrides:
                d["overrides"] = [{"match": p, "method": c.to_dict()} for p, c in s.overrides]
            steps.append(d)
        cal = self.calib.to_dict()
        cal.pop("type")
        cal.pop("version")
        return {"brainsurgeon_recipe": RECIPE_VERSION, "steps": steps, "calib": cal}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict) or d.get("brainsurgeon_recipe") != RECIPE_VERSION:
            raise ConfigError(f"not a brainsurgeon recipe of version {RECIPE_VERSION}: the top level "
                              f"must contain 'brainsurgeon_recipe: {RECIPE_VERSION}'")
        unknown = sorted(set(d) - {"brainsurgeon_recipe", "steps", "calib"})
        if unknown:
            raise ConfigError(f"recipe: unknown top-level key(s) {unknown}; allowed: steps, calib")
        steps = []
        if not isinstance(d.get("steps") or [], list):
            raise ConfigError(f"recipe: 'steps' must be a list of steps, got {d.get('steps')!r}")
        if not isinstance(d.get("calib") or {}, dict):
            raise ConfigError(f"recipe: 'calib' must be a mapping of CalibOptions fields, got {d.get('calib')!r}")
        for i, s in enumerate(d.get("steps") or []):
            if not isinstance(s, dict) or "method" not in s:
                raise ConfigError(f"recipe step {i}: must be a mapping with a 'method' key")
            extra = sorted(set(s) - {"method", "ignore", "overrides"})
            if extra:
                raise ConfigError(f"recipe step {i}: unknown key(s) {extra}; "
                                  f"allowed: method, ignore, overrides")
            overs = s.get("overrides") or []
            if not isinstance(overs, list):
                raise ConfigError(f"recipe step {i}: overrides must be a list of {{match: regex, method: "
                                  f"{{type: ...}}}} entries (in order, first match wins), got {overs!r}")
            for j, o in enumerate(overs):
                if not isinstance(o, dict) or set(o) != {"match", "method"} or not isinstance(o["match"], str):
                    raise ConfigError(f"recipe step {i}, override {j}: must be a mapping with exactly the keys "
                                      f"'match' (a module-name regex) and 'method' (a config), got {o!r}; e.g. "
                                      f"{{match: 'fc.*', method: {{type: RTN, bits: 8}}}}")
            over = tuple((o["match"], config_from_dict(o["method"])) for o in overs)
            ignore = s.get("ignore") or []
            if not (isinstance(ignore, str) or isinstance(ignore, list) and all(isinstance(p, str) for p in ignore)):
                raise ConfigError(f"recipe step {i}: ignore must be a module-name regex or a list of them, "
                                  f"got {ignore!r}; e.g. ignore: [fc3]")
            steps.append(Step(config_from_dict(s["method"]), as_patterns(ignore), over))
        if not steps:
            raise ConfigError("recipe: 'steps' is empty; add e.g. "
                              "steps: [{method: {type: ExactOBS, sparsity: 0.5}}]")
        cal = config_from_dict({"type": "CalibOptions", **(d.get("calib") or {})})
        return Recipe(tuple(steps), cal)  # type: ignore[arg-type]


def W8A8(weights: str = "GPTQ", observer: str = "minmax", granularity: str = "tensor",
         options: CalibOptions | None = None, smooth: float = 0.0) -> Recipe:
    """Shorthand recipe: 8-bit static activations (per tensor, asymmetric) and 8-bit symmetric
    per-channel weights by `weights` (GPTQ, OBQ or RTN), solved on the quantized inputs; `smooth`: the
    SmoothQuant strength alpha (0 = off).

    >>> rep = compress(model, W8A8(), calib=loader)
    >>> W8A8("RTN", granularity="token").steps[0].method.dynamic
    True
    """
    cls = _REGISTRY.get(weights)
    if cls is None or cls.verb != "quantize":
        raise ConfigError(f"W8A8: weights={weights!r} is not a weight quantizer; use 'GPTQ', 'OBQ' or 'RTN'")
    act = ActQuant(bits=8, granularity=granularity, observer=observer, sym=granularity == "token", smooth=smooth)
    return Recipe((Step(act), Step(cls(bits=8, sym=True))), options or CalibOptions())


def read_yaml(path_or_text: str, what: str) -> Any:
    """Parse YAML from a file path or a YAML string with ``yaml.safe_load``; `what` names it in errors.

    >>> read_yaml("levels: 4", "search space")
    {'levels': 4}
    """
    import os

    import yaml

    if not isinstance(path_or_text, str | os.PathLike):
        raise ConfigError(f"{what}: expected a YAML file path or YAML text, got {type(path_or_text).__name__}")
    text = os.fspath(path_or_text)
    looks_like_path = "\n" not in text and text.lower().endswith((".yaml", ".yml", ".json"))
    if os.path.isdir(text):
        raise ConfigError(f"{what} {text!r} is a directory; pass the YAML file inside it")
    if os.path.exists(text):
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} file {path_or_text!r} is not UTF-8 text ({e}); save it as UTF-8 YAML") from e
        except OSError as e:
            raise ConfigError(f"{what} file {path_or_text!r} cannot be read ({e})") from e
    elif looks_like_path:
        raise ConfigError(f"{what} file {text!r} not found (current folder {os.getcwd()!r}); check the path")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {e}") from e


def load_recipe(path_or_text: str) -> Recipe:
    """Read a YAML recipe from a file path or a YAML string.

    >>> r = load_recipe("recipes/digits-obs75-obq4.yaml")
    """
    return Recipe.from_dict(read_yaml(path_or_text, "recipe"))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text (round-trips through :func:`load_recipe`)."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
