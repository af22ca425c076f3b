"""A Plan: the per-layer choice of a solver, as an ordered module-name -> configs map.

A plan turns into an ordinary :class:`~brainsurgeon.config.Recipe` (a sparsify step and/or a
quantize step whose per-layer ``overrides`` are the plan's choices: the format recipes already
use), so ``brainsurgeon compress --recipe plan.yaml`` applies it::

    >>> plan = Plan((("conv1", ()), ("fc1", (ExactOBS(sparsity=0.75), OBQ(bits=4)))), ("dense", "sp+w4"))
    >>> print(dump_recipe(plan.to_recipe()))
    >>> plan.save("plan.yaml"); Plan.load("plan.yaml") == plan
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .._io import atomic_open
from ..config import CalibOptions, Config, Recipe, Step, config_from_dict, dump_recipe, load_recipe
from ..errors import ConfigError


def _unescape(pattern: str) -> str:
    return re.sub(r"\\(.)", r"\1", pattern)


@dataclass(frozen=True)
class Plan:
    """layers: ordered (module name, configs applied in order; () = kept dense);
    variants: the database variant name per layer; skipped: layers outside the search (dense);
    info: solver, budget, predicted cost fraction and score (for reports; not part of equality).
    """

    layers: tuple[tuple[str, tuple[Config, ...]], ...]
    variants: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.variants and len(self.variants) != len(self.layers):
            raise ConfigError(f"Plan: {len(self.variants)} variant names for {len(self.layers)} layers")

    def as_dict(self) -> dict[str, tuple[Config, ...]]:
        """{module name: configs}, in model order."""
        return dict(self.layers)

    def channel_items(self) -> list[tuple[str, Config]]:
        """(layer, config) of the structural channel-pruning choices, in model order."""
        return [(n, c) for n, cs in self.layers for c in cs if type(c).verb == "prune"]

    def to_dict(self) -> dict[str, Any]:
        """The plan format (``brainsurgeon_plan: 1``): layers with variant names and configs."""
        names = self.variants or ("",) * len(self.layers)
        return {"brainsurgeon_plan": 1, "info": dict(self.info),
                "layers": [{"name": n, "variant": v, "configs": [c.to_dict() for c in cs]}
                           for (n, cs), v in zip(self.layers, names, strict=True)],
                "skipped": list(self.skipped)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or d.get("brainsurgeon_plan") != 1:
            raise ConfigError("not a brainsurgeon plan: the top level must contain 'brainsurgeon_plan: 1'")
        layers = tuple((r["name"], tuple(config_from_dict(c) for c in r["configs"])) for r in d["layers"])
        variants = tuple(r.get("variant", "") for r in d["layers"])
        return Plan(layers, variants if all(variants) else (), tuple(d.get("skipped", ())), dict(d.get("info", {})))

    def _step(self, verb: str) -> Step | None:
        chosen = [(n, c) for n, cs in self.layers for c in cs if type(c).verb == verb]
        if not chosen:
            return None
        names = {n for n, _ in chosen}
        ignore = tuple(re.escape(n) for n, _ in self.layers if n not in names) + tuple(map(re.escape, self.skipped))
        return Step(chosen[0][1], ignore, tuple((re.escape(n), c) for n, c in chosen))

    def to_recipe(self, options: CalibOptions | None = None) -> Recipe:
        """A recipe: sparsify, quantize, then factorize (low-rank) and transform (compact designs) steps, each
        with one exact-name override per layer (those two last: they replace modules, the others keep them), and an
        activation step for joint variants (``compress`` runs it first: the solves see X_q).

        Default options: sequential calibration, then BatchNorm re-estimation.

        >>> plan.to_recipe(CalibOptions(bn_reestimate=True)).steps[0].overrides[0]
        ('conv2', ExactOBS(sparsity=0.5929, ...))
        """
        steps = tuple(s for s in (self._step("sparsify"), self._step("quantize"), self._step("factorize"),
                                  self._step("transform"), self._step("actquant"))
                      if s is not None)  # compress() runs actquant first
        return Recipe(steps, options or CalibOptions(bn_reestimate=True))

    def to_yaml(self, options: CalibOptions | None = None) -> str:
        """The recipe YAML with a comment header (solver, budget, predicted cost, per-layer variants)."""
        head = [f"# brainsurgeon search plan: {k}={v}" for k, v in self.info.items()]
        head += [f"# {n}: {v}" for (n, _), v in zip(self.layers, self.variants, strict=False)]
        head += [f"# skipped (dense): {n}" for n in self.skipped]
        if not self.to_recipe().steps:
            raise ConfigError("Plan: every layer stays dense (the budget allows the dense model), so there is no "
                              "recipe to write; Plan.save() writes it in the plan format, or use a tighter budget")
        return "\n".join(head) + "\n" + dump_recipe(self.to_recipe(options))

    def save(self, path: str) -> None:
        """Write :meth:`to_yaml` atomically; ``brainsurgeon compress --recipe PATH`` applies it.

        A plan with structural channel choices (no recipe can express ``prune_`` yet), or the dense
        plan (a budget the dense model meets), is written in the plan format (:meth:`to_dict`); apply
        it with :func:`apply_plan_` (a no-op for the dense plan).
        """
        import yaml

        dense = not self.to_recipe().steps  # a budget the dense model meets: the dense plan, nothing to apply
        plain = self.channel_items() or dense
        text = yaml.safe_dump(self.to_dict(), sort_keys=False) if plain else self.to_yaml()
        with atomic_open(path, "w") as f:
            f.write(text)

    @staticmethod
    def from_recipe(recipe: Recipe) -> Plan:
        """Rebuild a plan from a recipe whose steps carry one exact-name override per layer."""
        layers: dict[str, list[Config]] = {}
        skipped: set[str] | None = None
        for step in recipe.steps:
            for pat, cfg in step.overrides:
                layers.setdefault(_unescape(pat), []).append(cfg)
            ign = {_unescape(p) for p in step.ignore}
            skipped = ign if skipped is None else skipped & ign
        names = list(layers)
        skip = tuple(sorted((skipped or set()) - set(names)))
        return Plan(tuple((n, tuple(layers[n])) for n in names), (), skip)

    @staticmethod
    def load(path: str) -> Plan:
        """Read a plan written by :meth:`save` (a recipe, or the plan format for channel plans)."""
        import yaml

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if isinstance(data, dict) and "brainsurgeon_plan" in data:
            return Plan.from_dict(data)
        return Plan.from_recipe(load_recipe(path))
