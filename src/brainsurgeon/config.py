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
    _REGISTRY[cls.__name__] = cls
    return cls


def registered_configs() -> list[str]:
    """Names of every registered config type."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Config:
    """Base of all method configs: dict round trip with a type tag and version."""

    verb: ClassVar[str] = ""  # "sparsify" or "quantize": which verb applies this config

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
    _check(0.0 <= obj.damp < 1.0, type(obj).__name__,
           f"damp (relative dampening, fraction of mean diag(H)) must be in [0, 1), got {obj.damp!r}")


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


@register_config
@dataclass(frozen=True)
class GPTQ(_QuantConfig):
    """GPTQ (Frantar et al., ICLR 2023): blocked lazy OBS updates via the Cholesky of H^-1."""

    act_order: bool = True
    blocksize: int = 128
    damp: float = 0.01
    refine: int = 0  # coordinate-descent passes on the grid after the solve (0 = off)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damp(self)
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

    def __post_init__(self) -> None:
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
        return f"ActQuant a{self.bits} {self.granularity} {obs}{' sym' if self.sym else ''}{sq}"


@register_config
@dataclass(frozen=True)
class CalibOptions(Config):
    """How calibration runs and what is re-calibrated afterwards.

    mode: ``sequential`` (GPTQ style: each layer sees the already-compressed layers' outputs)
    or ``dense`` (OBC style: every Hessian from the dense model).
    """

    mode: str = "sequential"
    max_batches: int = 0  # 0: all batches
    hessian_dtype: str = "float64"
    blocks: str = ""  # dotted path of a ModuleList of blocks (e.g. "model.layers"); "" = per layer
    offload: bool = False  # keep only the current block on the compute device
    bn_reestimate: bool = False
    correct_mean_std: bool = False

    def __post_init__(self) -> None:
        _check(self.mode in ("sequential", "dense"), "CalibOptions",
               f"mode must be 'sequential' or 'dense', got {self.mode!r}")
        _check(self.hessian_dtype in ("float32", "float64"), "CalibOptions",
               f"hessian_dtype must be 'float32' or 'float64', got {self.hessian_dtype!r}")
        _check(self.max_batches >= 0, "CalibOptions", "max_batches must be >= 0 (0 = all)")


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
        for pat, cfg in self.overrides:
            if type(cfg).verb != type(self.method).verb:
                raise ConfigError(f"override {pat!r}: {type(cfg).__name__} is a {type(cfg).verb} "
                                  f"config but the step is {type(self.method).verb}")


def match_configs(names: Iterable[str], default: Config, ignore: Iterable[str] = (),
                  overrides: Any = ()) -> dict[str, Config]:
    """Name -> config for every name that no `ignore` regex fully matches: the config of the first
    override whose regex fully matches the name, else `default`. overrides: an ordered
    {regex: config} dict or (regex, config) pairs (the format recipes and the budget search use).
    Every verb's planner (``api.plan_layers``, ``plan_factorization``, ``plan_sharing``) matches with it.

    >>> match_configs(["conv1", "fc1", "fc2"], RTN(bits=4), ignore=("fc2",), overrides={"fc.*": RTN(bits=8)})
    {'conv1': RTN(bits=4, ...), 'fc1': RTN(bits=8, ...)}
    """
    ign = [re.compile(p) for p in ignore]
    over = [(re.compile(p), c) for p, c in (overrides.items() if isinstance(overrides, dict) else overrides)]
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
        for i, s in enumerate(d.get("steps") or []):
            if not isinstance(s, dict) or "method" not in s:
                raise ConfigError(f"recipe step {i}: must be a mapping with a 'method' key")
            extra = sorted(set(s) - {"method", "ignore", "overrides"})
            if extra:
                raise ConfigError(f"recipe step {i}: unknown key(s) {extra}; "
                                  f"allowed: method, ignore, overrides")
            over = tuple((o["match"], config_from_dict(o["method"])) for o in s.get("overrides", []))
            steps.append(Step(config_from_dict(s["method"]), tuple(s.get("ignore", [])), over))
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

    text = path_or_text
    if os.path.exists(path_or_text):
        with open(path_or_text, encoding="utf-8") as f:
            text = f.read()
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
