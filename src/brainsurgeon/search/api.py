"""The search verbs: ``search`` (database + solver -> Plan), ``apply_plan_`` and ``stitch_``.

    >>> plan = search(model, SearchSpace(), "flops=0.25", calib, db="db/")          # DP by default
    >>> plan = search(model, "recipes/search-digits.yaml", "bops=8x", calib, eval_fn=acc, solver="amc")
    >>> report = apply_plan_(model, plan, calib)      # re-solves with the verbs, then BN re-estimation
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..config import CalibOptions
from ..errors import ConfigError
from ..report import CompressionReport
from .amc import AMC, AMCSearch
from .config import Budget, SearchSpace, load_space
from .database import Entry, SearchTable, _Distortion, build_database
from .plan import Plan
from .solve import layer_weight, set_layer_weight_
from .solvers import dp_plan, global_magnitude_plan, uniform_plan

log = get_logger(__name__)
SOLVERS = ("dp", "uniform", "global-magnitude", "amc", "amc-resource", "amc-accuracy")


class StitchedModel:
    """A private copy of the model whose searched layers take database weights; scores choices.

    ``error(entries)`` = 1 - eval_fn(model) if eval_fn is given (eval_fn returns accuracy-like,
    higher is better), else the model-output distortion on the calibration batches.
    """

    def __init__(self, model: nn.Module, table: SearchTable, calib: Any,
                 eval_fn: Callable[[nn.Module], float] | None = None, batches: int = 4) -> None:
        from ..calib import cache_batches

        self.table, self.eval_fn = table, eval_fn
        self.dist = _Distortion(model, list(cache_batches(calib, batches)))
        self.model, self.modules = self.dist.model, self.dist.modules
        self.dense = {n: layer_weight(self.modules[n]).clone() for n in table.layers}
        self._cache: dict[str, torch.Tensor] = {}

    def weight(self, e: Entry) -> torch.Tensor:
        if not e.shard:
            return self.dense[e.layer]
        if e.key not in self._cache:
            self._cache[e.key] = self.table.db.weight(e).to(self.dense[e.layer].device)
        return self._cache[e.key]

    def load(self, entries: list[Entry]) -> nn.Module:
        for e in entries:
            set_layer_weight_(self.modules[e.layer], self.weight(e))
        return self.model

    def error(self, entries: list[Entry]) -> float:
        model = self.load(entries)
        if self.eval_fn is None:
            with torch.no_grad():
                num = sum(float(((self.dist._out(b) - d) ** 2).sum())
                          for b, d in zip(self.dist.batches, self.dist.dense, strict=True))
            return num / max(sum(float((d**2).sum()) for d in self.dist.dense), 1e-300)
        return 1.0 - float(self.eval_fn(model))


def plan_entries(table: SearchTable, plan: Plan) -> list[Entry]:
    """The database entries a plan chose (plans from the database only: dp, uniform, amc)."""
    if not plan.variants:
        raise ConfigError("this plan has no database variant names (it was loaded from a recipe or made by "
                          "global-magnitude); apply it with apply_plan_ instead of stitching")
    out = []
    for (name, _), v in zip(plan.layers, plan.variants, strict=True):
        hit = [e for e in table.entries.get(name, []) if e.variant == v]
        if not hit:
            raise ConfigError(f"plan layer {name!r} variant {v!r} is not in the database table; rebuild the "
                              f"database with the same model, search space and calibration data")
        out.append(hit[0])
    return out


def search(model: nn.Module, space: SearchSpace | str, budget: Budget | str, calib: Any,
           eval_fn: Callable[[nn.Module], float] | None = None, solver: str = "dp", *,
           db: str | None = None, executor: str | Executor = "inline", amc: AMC | None = None) -> Plan:
    """Build (or resume) the per-layer database, then solve for a plan under `budget`.

    space: a SearchSpace or a YAML path; budget: a Budget or ``"flops=0.25"`` / ``"bops=8x"``;
    calib: calibration batches; eval_fn(model) -> accuracy (AMC's reward; default: output
    distortion on calib); solver: dp | uniform | global-magnitude | amc (= amc-resource) |
    amc-accuracy; db: database folder (default: a fresh temporary one, not resumable);
    executor: inline | process | ray | a concurrent.futures.Executor. The model is not modified.

    >>> plan = search(model, SearchSpace(levels=8), "flops=0.25", calib, db="db/")
    >>> plan.info["cost"] <= 0.25
    True
    """
    if solver not in SOLVERS:
        raise ConfigError(f"search: unknown solver {solver!r}; use one of {list(SOLVERS)}")
    space = load_space(space) if isinstance(space, str) else space
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"search: space must be a SearchSpace or a YAML path, got {type(space).__name__}")
    root = db or tempfile.mkdtemp(prefix="brainsurgeon-db-")
    table = build_database(model, space, calib, root, executor)
    if solver == "dp":
        plan = dp_plan(table, budget)
    elif solver == "uniform":
        plan = uniform_plan(table, budget)
    elif solver == "global-magnitude":
        plan = global_magnitude_plan(model, table, budget)
    else:
        cfg = amc or AMC()
        if solver != "amc":
            cfg = _with_mode(cfg, solver.split("-", 1)[1])
        plan = AMCSearch(cfg, table, budget, StitchedModel(model, table, calib, eval_fn).error).run()
    plan.info["db"] = str(root)
    log.info("search %s %s: cost %.4f of dense, score %.4g", solver, budget, plan.info["cost"], plan.info["score"])
    return plan


def _with_mode(cfg: AMC, mode: str) -> AMC:
    d = cfg.to_dict()
    d.pop("type")
    d.pop("version")
    return AMC(**{**d, "mode": mode})


def stitch_(model: nn.Module, plan: Plan, table: SearchTable) -> nn.Module:
    """Set each planned layer's weight to its database weight in place (OBC's stitching); no solve.

    >>> stitch_(model, plan, table)
    """
    modules = dict(model.named_modules())
    entries = plan_entries(table, plan)
    weights = [(modules[e.layer], table.db.weight(e)) for e in entries if e.shard]  # read all before writing
    for mod, W in weights:
        set_layer_weight_(mod, W.to(mod.weight.device))
    return model


def _check_plan_fits(model: nn.Module, plan: Plan) -> None:
    from ..calib import supported

    names = {n for n, m in model.named_modules() if n and supported(m)}
    planned = {n for n, _ in plan.layers} | set(plan.skipped)
    if planned != names:
        raise ConfigError(f"the plan does not fit {type(model).__name__}: layers in the plan but not in the model: "
                          f"{sorted(planned - names)}; supported layers of the model missing from the plan: "
                          f"{sorted(names - planned)}. Search again on this model")


def apply_plan_(model: nn.Module, plan: Plan, calib: Any, options: CalibOptions | None = None) -> CompressionReport:
    """Compress `model` in place as planned, through the verbs (``brainsurgeon.api.compress``).

    Default options: sequential calibration, then BatchNorm re-estimation on `calib`. On any
    failure the model is restored (the verbs' rollback).

    >>> report = apply_plan_(model, plan, calib)
    >>> report = apply_plan_(model, plan, calib, CalibOptions(bn_reestimate=False))
    """
    from ..api import compress
    from ..calib import reestimate_batchnorm_

    _check_plan_fits(model, plan)
    options = options or CalibOptions(bn_reestimate=True)
    recipe = plan.to_recipe(options)
    if recipe.steps:
        return compress(model, recipe, calib)
    report = CompressionReport()
    if options.bn_reestimate:
        n = reestimate_batchnorm_(model, calib, options.max_batches)
        report.notes.append(f"plan keeps every layer dense; BatchNorm statistics re-estimated ({n} layers)")
    return report
