"""The search verbs: ``search`` (database + solver -> Plan), ``apply_plan_`` and ``stitch_``.

    >>> plan = search(model, SearchSpace(), "flops=0.25", calib, db="db/")          # DP by default
    >>> plan = search(model, "recipes/search-digits.yaml", "bops=8x", calib, eval_fn=acc, solver="amc")
    >>> plan = search(model, channel_space, "flops=4x", calib, eval_fn=acc, solver="amc-accuracy")  # walks
    >>> report = apply_plan_(model, plan, calib)      # re-solves with the verbs, then BN re-estimation
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..config import CalibOptions, config_from_dict
from ..errors import ConfigError
from ..report import CompressionReport
from .amc import AMC, AMCSearch
from .channels import ChannelWalk, apply_channels_, measured_fraction
from .config import Budget, SearchSpace, load_space
from .damage import OutputDamage
from .database import Entry, SearchTable, build_database
from .factored import factorized_module, separable_module
from .plan import Plan
from .solve import layer_weight, set_layer_weight_
from .solvers import dp_plan, global_magnitude_plan, uniform_plan, uniform_seeds, within_measured_budget
from .spdy import SPDY, spdy_plan

log = get_logger(__name__)
SOLVERS = ("dp", "spdy", "uniform", "global-magnitude", "amc", "amc-resource", "amc-accuracy")


class StitchedModel:
    """A private copy of the model whose searched layers take database weights; scores choices.

    ``error(entries)`` = 1 - eval_fn(model) if eval_fn is given (eval_fn returns accuracy-like,
    higher is better), else the output damage on the calibration batches (`metric`: "mse", the
    relative distortion; "kl", the mean KL to the dense softmax, :mod:`.scores`). Channel
    entries are applied by pruning a fresh copy (``prune_``), weight entries by loading shards.
    Joint entries (``8w8a``, ``2:4+4w4a``, ...) are scored as :func:`stitch_` builds them: a fresh
    copy with the weights in place and the input quantizers calibrated on `act_calib` (default:
    the scoring batches), so the score is the loss of the very model a plan stitches to.
    """

    def __init__(self, model: nn.Module, table: SearchTable, calib: Any,
                 eval_fn: Callable[[nn.Module], float] | None = None, batches: int = 4,
                 metric: str = "mse", act_calib: Any = None) -> None:
        from ..calib import cache_batches

        self.table, self.eval_fn = table, eval_fn
        self.batches = cache_batches(calib, batches)
        self.act_calib = self.batches if act_calib is None else cache_batches(act_calib)
        self.dist = OutputDamage(model, self.batches, metric)
        self.model, self.modules = self.dist.model, self.dist.modules
        self.base = copy.deepcopy(self.model)
        self.dense = {n: layer_weight(self.modules[n]).clone() for n in table.layers}
        self.names = list(table.profiles)
        self._cache: dict[str, torch.Tensor] = {}

    def weight(self, e: Entry) -> torch.Tensor:
        if not e.shard:
            return self.dense[e.layer]
        if e.key not in self._cache:
            self._cache[e.key] = self.table.db.weight(e).to(self.dense[e.layer].device)
        return self._cache[e.key]

    def load(self, entries: list[Entry]) -> nn.Module:
        """The model with `entries` applied (a fresh pruned copy if any entry is structural)."""
        if any(e.structural for e in entries):
            m = copy.deepcopy(self.base)
            apply_channels_(m, [(e.layer, config_from_dict(e.configs[0])) for e in entries if e.structural],
                            example_of(self.batches), self.batches, self.names)
            return m
        acts = {e.layer: c for e in entries for c in map(config_from_dict, e.configs) if type(c).verb == "actquant"}
        if acts:  # stitch_'s model: weights in place, then the input quantizers calibrated on act_calib
            from ..quant.act import insert_act_quant_

            m = copy.deepcopy(self.base)
            mods = dict(m.named_modules())
            for e in entries:
                set_layer_weight_(mods[e.layer], self.weight(e))
            insert_act_quant_(m, acts, self.act_calib)
            return m
        for e in entries:
            set_layer_weight_(self.modules[e.layer], self.weight(e))
        return self.model

    def error(self, entries: list[Entry]) -> float:
        return self.model_error(self.load(entries))

    def model_error(self, model: nn.Module) -> float:
        """The error of any model (e.g. one AMC walked): 1 - eval_fn(model), or its output distortion."""
        if self.eval_fn is None:
            return self.dist.model_damage(model)
        return 1.0 - float(self.eval_fn(model))


def example_of(batches: list[Any]) -> Any:
    """One sample of the first (args, kwargs) batch, as example inputs for tracing."""
    args, kwargs = batches[0]
    if args:
        return args[0][:1]
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def channel_cost_fn(model: nn.Module, table: SearchTable, calib: Any, budget: Budget) -> Callable[[Plan], float]:
    """Plan -> measured cost fraction after pruning a copy (the check of :func:`within_measured_budget`)."""
    from ..calib import cache_batches

    batches = list(cache_batches(calib, 4))
    names = list(table.profiles)
    return lambda plan: measured_fraction(model, plan.channel_items(), example_of(batches), batches, names,
                                          budget.metric, table.act_bits)


def channel_walk(model: nn.Module, table: SearchTable, calib: Any, budget: Budget) -> ChannelWalk:
    """AMC's environment for a channel table: a walk over a copy of `model` measuring `budget.metric`."""
    from ..calib import cache_batches

    batches = list(cache_batches(calib, 4))
    return ChannelWalk(copy.deepcopy(model).eval(), list(table.profiles), example_of(batches), batches,
                       budget.metric, table.act_bits)


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
           db: str | None = None, executor: str | Executor = "inline", amc: AMC | None = None,
           spdy: SPDY | None = None, options: CalibOptions | None = None) -> Plan:
    """Build (or resume) the per-layer database, then solve for a plan under `budget`.

    space: a SearchSpace or a YAML path; budget: a Budget or ``"flops=0.25"`` / ``"bops=8x"``;
    calib: calibration batches; eval_fn(model) -> accuracy (AMC's reward and SPDY's objective;
    default: output distortion on calib, KL for SPDY); solver: dp | spdy | uniform |
    global-magnitude | amc (= amc-resource) | amc-accuracy; spdy: SPDY's settings;
    db: database folder (default: a fresh temporary one, not resumable);
    executor: inline | process | ray | a concurrent.futures.Executor; options: how the database's Hessians
    are fed (``build_database``; default ``CalibOptions()``). The model is not modified.

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
    structural = bool(space.channel_ratios)
    from ..calib import cache_batches

    calib = cache_batches(calib)  # read once: the database, the cost checks and AMC reuse the batches
    root = db or tempfile.mkdtemp(prefix="brainsurgeon-db-")
    table = build_database(model, space, calib, root, executor, options=options)
    measure = channel_cost_fn(model, table, calib, budget) if structural else None
    if solver == "dp":
        plan = within_measured_budget(table, budget, measure) if measure else dp_plan(table, budget)
    elif solver == "uniform":
        plan = uniform_plan(table, budget, measure)
    elif solver == "global-magnitude":
        plan = global_magnitude_plan(model, table, budget)
    elif solver == "spdy":
        if structural:
            raise ConfigError("search: solver 'spdy' stitches database weights, so it needs a per-weight space; "
                              "for channel spaces use solver='dp' or 'amc'")
        cfg_s = spdy or SPDY()
        stitched = StitchedModel(model, table, calib, eval_fn, cfg_s.batches, cfg_s.metric, act_calib=calib)
        plan = spdy_plan(table, budget, stitched.error, cfg_s, seeds=uniform_seeds(table, budget))
    else:
        cfg = amc or AMC()
        if solver != "amc":
            cfg = _with_mode(cfg, solver.split("-", 1)[1])
        stitched = StitchedModel(model, table, calib, eval_fn)
        walk = channel_walk(model, table, calib, budget) if structural else None
        plan = AMCSearch(cfg, table, budget, stitched.error, walk, stitched.model_error if walk else None).run()
    plan.info["db"] = str(root)
    log.info("search %s %s: cost %.4f of dense, score %.4g", solver, budget, plan.info["cost"], plan.info["score"])
    return plan


def _with_mode(cfg: AMC, mode: str) -> AMC:
    d = cfg.to_dict()
    d.pop("type")
    d.pop("version")
    return AMC(**{**d, "mode": mode})


def stitch_(model: nn.Module, plan: Plan, table: SearchTable, calib: Any = None) -> nn.Module:
    """Set each planned layer's weight to its database weight in place (OBC's stitching); no solve.

    Low-rank entries swap in the factorized module (LowRankLinear / LowRankConv2d) of that weight,
    compact-design entries (``sep-KIND@p``) the Separable module of that kernel.
    Joint entries (``8w8a``, ``2:4+4w4a``, ...) also get their input quantizer, calibrated on `calib`
    with the stitched weights in place.

    >>> stitch_(model, plan, table)
    """
    modules = dict(model.named_modules())
    entries = plan_entries(table, plan)
    if any(e.structural for e in entries):
        from ..calib import cache_batches

        if calib is None:
            raise ConfigError("stitch_: a plan with channel variants needs calib= (example inputs for the surgery)")
        batches = list(cache_batches(calib, 4))
        apply_channels_(model, [(e.layer, config_from_dict(e.configs[0])) for e in entries if e.structural],
                        example_of(batches), batches, list(table.profiles))
    acts = {e.layer: c for e in entries for c in map(config_from_dict, e.configs) if type(c).verb == "actquant"}
    if acts and calib is None:
        raise ConfigError(f"stitch_: the plan quantizes the inputs of {len(acts)} layers (joint variants); pass "
                          f"calib= to calibrate their activation scales")
    weights = [(e, modules[e.layer], table.db.weight(e)) for e in entries if e.shard]  # read all before writing
    for e, mod, W in weights:
        if e.variant.startswith("lr@"):  # low-rank: the factorized module itself (exact: W has that rank)
            model.set_submodule(e.layer, factorized_module(mod, W.to(mod.weight.device), e.configs[0]["rank"]))
        elif e.variant.startswith("sep-"):  # compact design: its module (exact: W has the design's structure)
            model.set_submodule(e.layer, separable_module(mod, W.to(mod.weight.device), config_from_dict(e.configs[0])))
        else:
            set_layer_weight_(mod, W.to(mod.weight.device))
    if acts:
        from ..quant.act import insert_act_quant_

        insert_act_quant_(model, acts, calib)  # type: ignore[arg-type]
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
    from .._state import ModelSnapshot
    from ..api import compress
    from ..calib import cache_batches, reestimate_batchnorm_, supported

    _check_plan_fits(model, plan)
    options = options or CalibOptions(bn_reestimate=True)
    recipe = plan.to_recipe(options)
    report = CompressionReport()
    if not plan.channel_items() and not recipe.steps:
        report.notes.append("the plan keeps every layer dense (its budget allows the dense model): nothing applied")
        return report
    snapshot = ModelSnapshot(model).keep_all()  # the channel surgery and the recipe are undone together, in place
    try:
        if plan.channel_items():
            calib = cache_batches(calib, options.max_batches)  # read once: the surgery and the steps reuse it
            names = [n for n, m in model.named_modules() if n and supported(m)]
            apply_channels_(model, plan.channel_items(), example_of(calib), calib, names)
            report.notes.append("channels removed: " + ", ".join(f"{n} {c.describe()}"
                                                                 for n, c in plan.channel_items()))
        if recipe.steps:
            report.extend(compress(model, recipe, calib))
            return report
    except BaseException:
        snapshot.restore_()
        raise
    if options.bn_reestimate:
        n = reestimate_batchnorm_(model, calib, options.max_batches)
        report.notes.append(f"BatchNorm statistics re-estimated on calibration data ({n} layers)")
    return report
