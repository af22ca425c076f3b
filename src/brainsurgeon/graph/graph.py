"""DependencyGraph: trace once, then query groups of coupled channels and prune them, verified.

    >>> g = DependencyGraph(model, example_inputs=(torch.randn(1, 3, 32, 32),))
    >>> grp = g.group(model.conv1, dim="out", idxs=[0, 2, 6])
    >>> print(grp)                      # every coupled slice, by module name
    >>> grp.prune()                     # physically smaller; outputs verified in eval and train mode
    >>> for grp in g.groups():          # every prunable set at full width, for pruners to score
    ...     print(grp.root.name, grp.n)

DepGraph: Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (groups as the closure
of a request over inter-layer dependencies). Here dependencies are index maps between ATen-level
(tensor, dim) nodes, so one closure covers grouped convs, heads, flatten and reshapes alike.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._log import get_logger
from ..errors import BrainsurgeonError, CalibrationError, ConfigError, UnsupportedOpError
from . import rules_nn, rules_timm, rules_views  # noqa: F401  (register the op rules)
from .commit import PruneMixin
from .group import Group, Slice
from .hf import _attr
from .maps import Closure, Edges, Key, closure, unique_ints
from .rules import Ctx, apply_module_rules, find_rule, refs
from .trace import Ref, Trace, flat_tensors, in_mode, run_model
from .untraced import untraced_hit, untraced_widths
from .view_attrs import record_view_attrs

log = get_logger(__name__)

DEFAULT_ROOTS: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.RNNBase,
                                   nn.MultiheadAttention, nn.Bilinear)


def _root_spec(m: nn.Module, dim: str) -> tuple[str, int]:
    """(tensor, dim) of a module's 'out' or 'in' channels."""
    if isinstance(m, nn.modules.conv._ConvNd):
        out, inn = (1, 0) if m.transposed else (0, 1)
        return "weight", out if dim == "out" else inn
    if isinstance(m, nn.Embedding):
        return "weight", 1 if dim == "out" else 0
    if isinstance(m, nn.RNNBase):
        return ("weight_hh_l0", 1) if dim == "out" else ("weight_ih_l0", 1)
    if isinstance(m, nn.MultiheadAttention):
        return ("in_proj_weight", 1) if m.in_proj_weight is not None else ("q_proj_weight", 1)
    if _is_conv1d(m):   # transformers' Conv1D (GPT-2): a Linear with the weight stored [in, out]
        return "weight", 1 if dim == "out" else 0
    if _is_experts(m):   # MoE experts stored as one [E, 2I, H] tensor (Mixtral): the FFN width of every expert
        return "gate_up_proj", 1 if dim == "out" else 2
    if dim == "out":
        return "weight", 0
    return "weight", 1


def _is_conv1d(m: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised by name (importing transformers is not a graph dependency)."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")


def _is_experts(m: nn.Module) -> bool:
    """A transformers MoE experts module: ``gate_up_proj`` [experts, 2 x intermediate, hidden] (+ ``down_proj``)."""
    w = _attr(m, "gate_up_proj")   # getattr(m, name, None) without nn.Module's raise-and-catch for a missing name
    return w is not None and isinstance(w, nn.Parameter) and w.dim() == 3 and \
        isinstance(_attr(m, "down_proj"), nn.Parameter)


def slice_role(m: nn.Module, tensor: str, dim: int) -> str:
    """'out' (channels produced here), 'in' (consumed here) or 'param' (everything else)."""
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or _is_conv1d(m):
        if tensor == "bias":
            return "out"
        if tensor == "weight":
            out = 1 if getattr(m, "transposed", False) or _is_conv1d(m) else 0
            return "out" if dim == out else "in" if dim == 1 - out else "param"
    if isinstance(m, nn.RNNBase):
        return "in" if tensor.startswith("weight_ih") and dim == 1 else "out"
    return "param"


class DependencyGraph(PruneMixin):
    """Coupled dimensions of ``model``, traced at the ATen level on ``example_inputs``.

    Args:
        model: any module whose forward runs on ``example_inputs`` (tuple, tensor or dict of kwargs).
        example_inputs: the inputs to trace and to verify every pruning step with.
        ignore: modules (or names) whose output channels are never pruned (their inputs may be).
        keep_io: never prune dims of the model's inputs and outputs (default True).
        train_trace: also trace in train mode: ``"auto"`` (when eval misses parameters, e.g. aux heads),
            True or False.
        verify: re-run the example input after every prune (eval and train mode) and restore on failure.
        tracer: ``"dispatch"`` (default: one eager forward under a TorchDispatchMode) or ``"export"``
            (``torch.export``'s ATen graph; slower and fails on data-dependent shapes).
        train_inputs: the inputs for train-mode tracing and verification when they differ from
            ``example_inputs`` (default: the same), e.g. ``(images, targets)`` for a torchvision detector,
            whose train-mode forward needs targets.

    >>> g = DependencyGraph(model, (torch.randn(1, 3, 32, 32),), ignore=[model.fc])
    >>> print(g.report())
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, ignore: Iterable[nn.Module | str] = (),
                 keep_io: bool = True, train_trace: bool | str = "auto", verify: bool = True,
                 tracer: str = "dispatch", train_inputs: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"DependencyGraph: model must be an nn.Module, got {type(model).__name__}")
        if train_trace not in (True, False, "auto"):
            raise ConfigError(f"DependencyGraph: train_trace must be True, False or 'auto', got {train_trace!r}")
        if tracer not in ("dispatch", "export"):
            raise ConfigError(f"DependencyGraph: tracer must be 'dispatch' or 'export', got {tracer!r}")
        self.tracer = tracer
        self.model = model
        self.example_inputs = example_inputs
        self.train_inputs = example_inputs if train_inputs is None else train_inputs
        self.keep_io = keep_io
        self.verify = verify
        self.train_trace = train_trace
        self.ignore = self._names(ignore)
        self.history: list[dict[str, Any]] = []
        self._step = 0
        self._trace_step = 0
        self._removed: dict[Key, int] = {}
        self._touched: dict[tuple[str, str, int], int] = {}
        self._dirty = False
        self._build()

    # ------------------------------------------------------------------ building
    def _name(self, m: nn.Module | str, names: dict[int, str] | None = None) -> str:
        """The name of a submodule given as a module or a name; ``names`` (id -> name) saves a model walk."""
        if isinstance(m, str):
            try:
                self.model.get_submodule(m)
            except AttributeError as e:
                raise ConfigError(f"no module named {m!r} in {type(self.model).__name__}; "
                                  f"use a name from model.named_modules()") from e
            return m
        if names is None:
            names = {id(mod): n for n, mod in self.model.named_modules()}
        if id(m) not in names:
            raise ConfigError(f"module {type(m).__name__} is not a submodule of {type(self.model).__name__}")
        return names[id(m)]

    def _names(self, mods: Iterable[nn.Module | str]) -> tuple[str, ...]:
        mods = list(mods)
        names = {id(mod): n for n, mod in self.model.named_modules()} if any(not isinstance(m, str) for m in mods) \
            else {}   # names given as strings are checked with get_submodule: no walk
        return tuple(self._name(m, names) for m in mods)

    def _build(self) -> None:
        t0 = time.perf_counter()
        counter = [0]
        if self.tracer == "export":
            from .trace_export import trace_model_export as trace_model
        else:
            from .trace import trace_model
        try:
            self.traces: list[Trace] = [trace_model(self.model, self.example_inputs, "eval", counter)]
        except BrainsurgeonError:
            raise
        except Exception as e:  # noqa: BLE001  (the user's forward failed on the example inputs: say so, keep the cause)
            raise CalibrationError(
                f"DependencyGraph: {type(self.model).__name__}'s forward failed on example_inputs "
                f"{_shapes(self.example_inputs)} ({type(e).__name__}: {str(e)[:300]}); pass example_inputs the "
                f"model accepts (shape, dtype and device of one real batch, e.g. torch.randn(1, 3, 224, 224)), "
                f"as a tensor, a tuple of args or a dict of kwargs") from e
        self.train_error: str | None = None
        used = {n.owner for n in self.traces[0].nodes.values() if n.owner}
        named = list(self.model.named_modules(remove_duplicate=False))
        distinct = _distinct(self.model, named)
        self._modules = dict(named)
        self._distinct = distinct                        # model.named_modules() at build time
        self._canon = {id(m): n for n, m in distinct}    # one name per module object
        params = {(mn, pn) for mn, m in distinct for pn, p in m._parameters.items() if p is not None}
        want_train = self.train_trace is True or (self.train_trace == "auto" and bool(params - used))
        if want_train:
            try:
                self.traces.append(trace_model(self.model, self.train_inputs, "train", counter))
            except Exception as e:  # noqa: BLE001  (a model may not run in train mode without targets)
                self.train_error = f"{type(e).__name__}: {e}"
                log.info("train-mode trace failed (%s); only eval mode is covered", self.train_error)
        # whether a train-mode forward works: known if traced, else found out lazily at the first verification
        self._train_ok: bool | None = True if any(t.mode == "train" for t in self.traces) else (
            False if want_train else None)
        self.nodes = {k: v for t in self.traces for k, v in t.nodes.items()}
        self.untraced = untraced_widths(self.model, {n.owner for n in self.nodes.values() if n.owner})
        self.edges = Edges()
        ctx = Ctx(self.edges, self.nodes)
        self.unsupported: Counter[str] = Counter()
        self.n_ops = 0
        for t in self.traces:
            for op in t.ops:
                self.n_ops += 1
                self._apply_rule(op, ctx)
        self._param_nodes: dict[tuple[str, str], list[int]] = {}
        for nid, node in self.nodes.items():
            if node.owner is not None:
                self._param_nodes.setdefault(node.owner, []).append(nid)
        for ids in self._param_nodes.values():
            for other in ids[1:]:
                for d in range(len(self.nodes[ids[0]].shape)):
                    ctx.link(ids[0], d, other, d)
        self._module_rules(ctx)
        self.view_attrs_ambiguous = record_view_attrs(self.model, self.traces, ctx)
        if self.keep_io:
            for t in self.traces:
                for nid in t.inputs:
                    ctx.block(nid, None, "model input")
                for nid in t.outputs:
                    ctx.block(nid, None, "model output")
        self._block_modules(ctx, self.ignore)
        self.owners: dict[int, list[tuple[str, str]]] = {}
        for mn, m in named:
            for pn, p in (*m._parameters.items(), *m._buffers.items()):
                if p is not None:
                    self.owners.setdefault(id(p), []).append((mn, pn))
        self._module_index = {n: i for i, (n, _) in enumerate(distinct)}
        self.build_seconds = time.perf_counter() - t0
        self._trace_step = self._step
        self._removed = {}
        self._dirty = False

    def _runs_in_train_mode(self) -> bool:
        try:
            with in_mode(self.model, "train"), torch.no_grad():   # flags and BN statistics restored
                run_model(self.model, self.train_inputs)
            return True
        except Exception as e:  # noqa: BLE001
            self.train_error = f"{type(e).__name__}: {e}"
            return False

    def _apply_rule(self, op: Any, ctx: Ctx) -> None:
        rule = find_rule(op.name)
        if rule is None:
            self.unsupported[op.name] += 1
            for t in refs(op.args) + [Ref(o) for o in op.outputs]:
                ctx.block(t, None, f"{op.name} (no rule)")
            return
        try:
            rule(op, ctx)
        except (IndexError, KeyError, TypeError, ValueError) as e:
            self.unsupported[f"{op.name} (rule failed: {e})"] += 1
            for t in refs(op.args) + [Ref(o) for o in op.outputs]:
                ctx.block(t, None, f"{op.name} (rule failed)")

    def _module_rules(self, ctx: Ctx) -> None:
        """Couplings that live in module code, not in ops: MHA ties embed_dim to the q/k/v widths."""
        for mn, m in self._distinct:
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                ids = self._param_nodes.get((mn, "in_proj_weight"))
                if ids:
                    e = m.embed_dim
                    ctx.gather(ids[0], 0, ids[0], 1, np.arange(3 * e) % e)
        apply_module_rules(self.model, self._param_nodes, ctx)

    def _block_modules(self, ctx: Ctx, names: tuple[str, ...]) -> None:
        """Block every non-input dim of the parameters of ``names`` and their submodules (ignored modules)."""
        if not names:
            return
        wanted = set(names)
        for (mn, pn), ids in self._param_nodes.items():
            parts = mn.split(".") if mn else []
            owner = next((a for a in ("", *(".".join(parts[:i + 1]) for i in range(len(parts)))) if a in wanted),
                         None)
            if owner is None:
                continue
            m = self._modules[mn]
            for nid in ids:
                for d in range(len(self.nodes[nid].shape)):
                    if slice_role(m, pn, d) != "in":
                        ctx.block(nid, [d], f"ignored module {owner!r}")

    def _refresh(self) -> None:
        if self._dirty:
            self._build()

    # ------------------------------------------------------------------ queries
    def group(self, module: nn.Module | str, dim: str | int = "out", idxs: Sequence[int] | torch.Tensor | None = None,
              *, tensor: str | None = None, rows: Sequence[int] | np.ndarray | None = None) -> Group:
        """The closure of removing channels ``idxs`` of ``module`` along ``dim`` ('out', 'in' or an int).

        ``rows`` gives the logical row of each index (default: one row per index); indices sharing a row
        are removed together, e.g. the same within-head dim of every head: ``rows=idxs % head_dim``.
        Raises UnsupportedOpError (naming the op) if an op without a rule, a model input/output or an
        ignored module blocks the request, and ConfigError for bad indices or indices that split a unit
        (a conv group, an attention head).

        >>> grp = g.group("features.0", "out", [0, 1])
        >>> per_dim = g.group("attn.qkv", "out", range(96), rows=np.arange(96) % 32)   # n == 32
        """
        self._refresh()
        name = self._name(module)
        m = self.model.get_submodule(name)
        if tensor is None:
            if not isinstance(dim, str):
                raise ConfigError("group: an integer dim needs tensor=..., e.g. g.group('fc', 0, [1], tensor='weight')")
            if dim not in ("out", "in"):
                raise ConfigError(f"group: dim must be 'out', 'in' or an int with tensor=..., got {dim!r}")
            tensor, d = _root_spec(m, dim)
        else:
            d = int(dim) if not isinstance(dim, str) else _root_spec(m, dim)[1]
        ids = self._param_nodes.get((name, tensor))
        if not ids:
            raise UnsupportedOpError(f"{name}.{tensor} was not used by the example inputs (eval or train mode), "
                                     f"so its dependencies are unknown; pass inputs that run {name!r}")
        size = self.nodes[ids[0]].shape[d]
        req = np.arange(size) if idxs is None else _int_indices(idxs, f"{name}.{tensor} dim {d}")
        if len(req) == 0:
            raise ConfigError(f"group: idxs for {name}.{tensor} dim {d} is empty; pass at least one index")
        if req.min() < 0 or req.max() >= size:
            raise ConfigError(f"group: idxs for {name}.{tensor} dim {d} must lie in [0, {size}); "
                              f"got min {req.min()}, max {req.max()}")
        if len(unique_ints(req)) != len(req):
            raise ConfigError(f"group: idxs for {name}.{tensor} dim {d} contain duplicates; pass distinct indices")
        lab = np.arange(len(req)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(lab) != len(req) or (rows is not None and
                                    not np.array_equal(unique_ints(lab), np.arange(lab.max() + 1))):
            raise ConfigError(f"group: rows for {name}.{tensor} dim {d} must give one row per index and use every "
                              f"row 0..n-1; got {len(lab)} rows for {len(req)} idxs")
        key = (ids[0], d)
        cl = closure(self.edges, key, req, lab)
        if not cl.blocked and int((cl.labels[key] >= 0).sum()) != len(req):   # a unit grew: try whole outer units
            strict = closure(self.edges, key, req, lab, prefer_fits=False)
            if not strict.blocked and int((strict.labels[key] >= 0).sum()) == len(req):
                cl = strict
        if cl.blocked:
            (k, why), more = cl.blocked[0], len(cl.blocked) - 1
            raise UnsupportedOpError(f"pruning {name}.{tensor} dim {d} is blocked by {why} "
                                     f"(at {self._describe(k)}){f' and {more} more' if more else ''}; "
                                     f"see g.report() for every blocked op")
        grp = self._make_group(cl, (name, tensor, d))
        if grp is None:
            raise UnsupportedOpError(f"pruning {name}.{tensor} dim {d}: the coupled slices do not split into "
                                     f"equal rows (ragged coupling, e.g. a channel shuffle); prune a coarser set")
        why = self._untraced(grp)
        if why:
            raise UnsupportedOpError(f"pruning {name}.{tensor} dim {d} is blocked by {why}")
        root_pos = grp.root.idxs.reshape(-1).numpy()
        if len(root_pos) != len(req):
            strict = closure(self.edges, key, req, lab, prefer_fits=False)
            alt = self._make_group(strict, (name, tensor, d)) if not strict.blocked else None
            grp = alt if alt is not None else grp          # suggest whole outer units (conv groups, heads)
            unit = grp.root.idxs.shape[1]
            raise ConfigError(f"group: {name}.{tensor} dim {d} channels are coupled in units of {unit} "
                              f"(grouped conv / attention head / reshape); idxs {sorted(req.tolist())[:8]} split a "
                              f"unit — pass whole units, e.g. idxs={grp.root.idxs[0].tolist()}")
        return grp

    def groups(self, ignore: Iterable[nn.Module | str] = (), root_types: tuple[type, ...] = DEFAULT_ROOTS
               ) -> list[Group]:
        """Every independent prunable set at full width (idxs = all channels), one group per coupled set.

        Blocked sets (reaching an op without a rule, model I/O, an ignored module) and sets with
        fewer than 2 rows are left out and listed by :meth:`report`.

        >>> for grp in g.groups(ignore=[model.fc]):
        ...     grp.select(torch.arange(grp.n // 2)).prune()
        """
        self._refresh()
        ign = self._names(ignore)
        covered: dict[tuple[str, str, int], np.ndarray] = {}   # positions already in a group
        out: list[Group] = []
        self.left_out: list[tuple[str, str]] = []
        for name, m in self._distinct:   # model.named_modules() as built (a structure change rebuilds the graph)
            if not (isinstance(m, root_types) or (root_types is DEFAULT_ROOTS and (_is_conv1d(m) or _is_experts(m)))):
                continue
            for which in ("out", "in"):
                tensor, d = _root_spec(m, which)
                ids = self._param_nodes.get((name, tensor))
                if not ids or len(self.nodes[ids[0]].shape) <= d:
                    continue
                if (name, tensor, d) in covered and covered[(name, tensor, d)].all():
                    continue
                size = self.nodes[ids[0]].shape[d]
                if size < 2:
                    continue
                cl = closure(self.edges, (ids[0], d), np.arange(size), np.arange(size), stop_when_blocked=True)
                if cl.blocked:
                    self.left_out.append((f"{name}.{tensor} dim {d}", cl.blocked[0][1]))
                    continue
                grp = self._make_group(cl, (name, tensor, d))
                if grp is None:
                    self.left_out.append((f"{name}.{tensor} dim {d}", "ragged coupling"))
                    continue
                positions = self._positions(grp)
                if any(k in covered and covered[k][pos].any() for k, pos in positions):
                    self.left_out.append((f"{name}.{tensor} dim {d}", "overlaps an earlier group (alternative "
                                                                       "coupling, e.g. within conv groups)"))
                    continue
                for k, pos in positions:
                    if k not in covered:
                        covered[k] = np.zeros(self.nodes[self._param_nodes[k[:2]][0]].shape[k[2]], dtype=bool)
                    covered[k][pos] = True
                if grp.n < 2:
                    self.left_out.append((f"{name}.{tensor} dim {d}", "a single unit"))
                    continue
                if any(_under(s.module, ign) and s.role != "in" for s in grp.slices):
                    self.left_out.append((f"{name}.{tensor} dim {d}", "touches an ignored module"))
                    continue
                why = self._untraced(grp)
                if why:
                    self.left_out.append((f"{name}.{tensor} dim {d}", why))
                    continue
                out.append(grp)
        return out

    def _untraced(self, grp: Group) -> str | None:
        if not self.untraced:
            return None
        sizes = {(s.module, s.tensor, s.dim): self.nodes[self._param_nodes[(s.module, s.tensor)][0]].shape[s.dim]
                 for s in grp.slices}
        return untraced_hit(grp.slices, sizes, self.untraced)

    @staticmethod
    def _positions(grp: Group) -> list[tuple[tuple[str, str, int], np.ndarray]]:
        return [((s.module, s.tensor, s.dim), s.idxs.reshape(-1).numpy()) for s in grp.slices]

    def _describe(self, key: Key) -> str:
        node = self.nodes.get(key[0])
        if node is None:
            return "an internal reshape factor"
        what = ".".join(node.owner) if node.owner else f"{node.kind} tensor {tuple(node.shape)}"
        return f"{what} dim {key[1]}"

    def _make_group(self, cl: Closure, root: tuple[str, str, int]) -> Group | None:
        per: dict[tuple[str, str, int], np.ndarray] = {}
        labels: dict[Key, np.ndarray] = {}
        for key, lab in cl.labels.items():
            node = self.nodes[key[0]]
            if node.owner is not None:
                per.setdefault((node.owner[0], node.owner[1], key[1]), lab)
            labels[key] = lab
        slices = []
        ident = np.arange(cl.n, dtype=np.int64)
        for (mn, tn, d), lab in per.items():
            idxs = _slice_idxs(lab, cl.n, ident)
            if idxs is None:
                return None
            m = self._modules.get(mn) or self.model.get_submodule(mn)
            slices.append(Slice(mn, tn, d, torch.from_numpy(idxs.copy()), slice_role(m, tn, d)))
        slices.sort(key=lambda s: ((s.module, s.tensor, s.dim) != root, self._module_index.get(s.module, 0),
                                   s.tensor, s.dim))
        reasons = tuple(sorted({why for _, why in cl.inexact}))
        return Group(tuple(slices), cl.n, slices[0], self, not reasons, reasons, 1, labels, self._step)

    # ------------------------------------------------------------------ report
    def report(self) -> str:
        """Tracer used, op counts, ops without rules and which dims they block, groups left out."""
        secs = ", ".join(f"{t.mode} {t.seconds:.3f}s ({len(t.ops)} ops)" for t in self.traces)
        tracer = "torch.export" if self.tracer == "export" else "aten-dispatch"
        lines = [f"DependencyGraph of {type(self.model).__name__}: tracer={tracer} ({secs}); "
                 f"build {self.build_seconds:.3f}s"]
        if self.train_error:
            lines.append(f"train mode not traced/verified: {self.train_error[:200]}")
        if self.untraced:
            lines.append("modules never reached by the example inputs (block the sets of their widths): "
                         + ", ".join(f"{n} {sorted(w)}" for n, w in sorted(self.untraced.items())))
        if self.unsupported:
            lines.append("ops without a rule (block every dim of their tensors):")
            lines += [f"  {name} x{c}" for name, c in self.unsupported.most_common()]
        reasons = Counter(why for why in self.edges.blocked.values())
        lines.append(f"blocked dims: {len(self.edges.blocked)}")
        lines += [f"  {c:5d}  {why}" for why, c in reasons.most_common(12)]
        if self.view_attrs_ambiguous:
            lines.append("view/reshape sizes held in module attributes that pruning cannot update (several int "
                         "attributes have that value, so it is not known which one to shrink; pruning the dim "
                         "fails verification): pass -1 for that size or keep it in a single attribute")
            lines += [f"  {m or '<root>'} ({type(self.model.get_submodule(m)).__name__}): size {s} = "
                      f"{', '.join('self.' + n for n in names)}"
                      for (m, s), names in sorted(self.view_attrs_ambiguous.items())]
        if getattr(self, "left_out", None):
            lines.append("sets left out of groups():")
            lines += [f"  {what}: {why}" for what, why in self.left_out]
        return "\n".join(lines)


def _distinct(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())`` from ``named`` = ``model.named_modules(remove_duplicate=False)`` (the same
    depth-first walk without the subtrees of modules already seen: each module at its first name, in the same
    order), without a second walk; a model with a class that overrides ``named_modules`` is asked directly.

    >>> shared = nn.Linear(2, 2); m = nn.Sequential(shared, shared)
    >>> [n for n, _ in _distinct(m, list(m.named_modules(remove_duplicate=False)))]
    ['', '0']
    """
    base = nn.Module.named_modules
    if any(type(m).named_modules is not base for _, m in named):
        return list(model.named_modules())
    seen: set[int] = set()
    out = []
    for n, m in named:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((n, m))
    return out


def _slice_idxs(lab: np.ndarray, n: int, ident: np.ndarray | None = None) -> np.ndarray | None:
    """Row ``r`` of the result: the positions labelled ``r`` (ascending), or None when the rows are ragged.
    ``ident`` (``arange(n)``): a labelling that is exactly it (position i is row i, most slices) takes no
    counting or sort.

    >>> _slice_idxs(np.array([1, -1, 0, 1, 0]), 2).tolist()
    [[2, 4], [0, 3]]
    """
    if ident is not None and len(lab) == n and np.array_equal(lab, ident):
        return ident.reshape(n, 1)
    on = np.nonzero(lab >= 0)[0]
    rows = lab[on]
    counts = np.bincount(rows, minlength=n)
    if counts.min() == 0 or counts.max() != counts.min():
        return None
    return on[np.argsort(rows, kind="stable")].reshape(n, -1)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)


def _int_indices(idxs: Any, what: str) -> np.ndarray:
    """``idxs`` as int64, refusing non-integers (0.5 would silently truncate to 0)."""
    try:
        t = torch.as_tensor(idxs).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"group: idxs for {what} must be a sequence of ints; got {idxs!r} ({e})") from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"group: idxs for {what} must be integers; got {t.dtype} values "
                          f"{t.tolist()[:5]}; pass channel indices such as [0, 2, 5]")
    return np.asarray(t, dtype=np.int64)


def _shapes(inputs: Any) -> str:
    """Shapes, dtypes and devices of the tensors in `inputs`, for error messages: '[(1, 3) float32 cpu]'."""
    ts = flat_tensors(inputs)
    if not ts:
        return f"(no tensors: {type(inputs).__name__})"
    return "[" + ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device}" for t in ts[:4]) + \
        (", ..." if len(ts) > 4 else "") + "]"
