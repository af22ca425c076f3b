"""Budgets and search: measured costs, a resumable per-layer database, DP/AMC/baseline solvers.

Per-weight variants (unstructured levels, N:M, block, bit widths, N:M + bits) are solved with the
OBS engine and stitched or re-applied with the verbs; low-rank variants (activation-aware SVD at a
rank per ratio) are applied by the factorize verb; structured channel-ratio variants (a space of
their own) go through ``brainsurgeon.prune`` and are re-checked against the measured cost (AMC
walks a real model over them).

    >>> from brainsurgeon.search import SearchSpace, search, apply_plan_
    >>> plan = search(model, SearchSpace(), "flops=0.25", calib, db="db/")
    >>> report = apply_plan_(model, plan, calib)

``search`` depends on ``obs`` and ``calib``; it applies plans through ``brainsurgeon.api``
(imported inside the functions).
"""

from .amc import AMC, AMCSearch
from .api import SOLVERS, StitchedModel, apply_plan_, channel_cost_fn, plan_entries, search, stitch_
from .channels import ChannelWalk
from .coevolve import coevolve, generator_fitness, l1_at_budget
from .config import Budget, SearchSpace, load_space
from .costs import LayerProfile, profile_layers, variant_costs, weight_bytes
from .damage import OutputDamage
from .database import Database, Entry, SearchTable, build_database
from .distributed import all_reduce_hessian, all_reduce_hessians, assign_owners
from .dp import choose_variants
from .evolve import Evolve, GeneticSearch, Individual
from .evolve_channels import ChannelSpace, evolve_channels
from .executors import InlineExecutor, RayExecutor, make_executor
from .latency import LatencyTable, machine_fingerprint, time_module
from .plan import Plan
from .scores import score_table
from .solvers import dp_plan, global_magnitude_plan, uniform_plan, uniform_seeds, within_measured_budget
from .spdy import SPDY, spdy_plan
from .variants import Variant, layer_variants

__all__ = [
    "AMC", "AMCSearch", "Budget", "ChannelWalk", "Database", "Entry", "InlineExecutor", "LatencyTable",
    "LayerProfile", "Plan",
    "RayExecutor", "SOLVERS", "SearchSpace", "SearchTable", "StitchedModel", "Variant", "apply_plan_",
    "build_database", "choose_variants", "dp_plan", "global_magnitude_plan", "layer_variants", "load_space",
    "machine_fingerprint", "make_executor", "plan_entries", "profile_layers", "search", "stitch_", "time_module",
    "uniform_plan", "uniform_seeds", "variant_costs", "weight_bytes", "channel_cost_fn", "within_measured_budget",
    "all_reduce_hessian", "all_reduce_hessians", "assign_owners", "OutputDamage", "score_table", "SPDY", "spdy_plan",
    # evolutionary channel search and co-evolution (Shu et al. 2019)
    "ChannelSpace", "Evolve", "GeneticSearch", "Individual", "coevolve", "evolve_channels", "generator_fitness",
    "l1_at_budget",
]
