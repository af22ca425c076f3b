"""A second tracer: ``torch.export``'s ATen graph, turned into the same records as :func:`trace.trace_model`.

``torch.export.export`` captures the forward symbolically (fake tensors), then ``run_decompositions()``
lowers it to core ATen (functional, composite ops such as ``linear``/``einsum``/``lstm`` decomposed, close
to what the dispatch tracer sees); every ``call_function`` node becomes an :class:`~.trace.OpRecord`, every tensor value
a :class:`~.trace.Node` (shapes from the fake values), and lifted parameters/buffers are mapped back to
``(module, attribute)`` through the graph signature. Small integer tensors (index arguments such as a
relative-position index) get their values from one interpreted run of the exported graph::

    >>> t = trace_model_export(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    >>> [op.name for op in t.ops]
    ['aten.permute', 'aten.addmm', 'aten.relu']

It is slower than the dispatch tracer and fails on data-dependent shapes (detection heads); use
``DependencyGraph(..., tracer="export")`` to cross-check a model whose eager code is unusual.
"""

from __future__ import annotations

import operator
import time
import warnings
from typing import Any

import torch
from torch import nn

from .._log import get_logger
from ..errors import UnsupportedOpError
from .trace import _INDEX_DTYPES, _MAX_VALUES, Node, OpRecord, Ref, Trace, _as_tuple, _owners, flat_tensors, in_mode

log = get_logger(__name__)


def _export(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (_as_tuple(example_inputs), {})
    try:
        with warnings.catch_warnings():   # RNNs re-assign _flat_weights during export: harmless here
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            ep = torch.export.export(model, args, kwargs, strict=False)
            return ep.run_decompositions()
    except Exception as e:  # noqa: BLE001  (export raises many unrelated types; all are reported the same way)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UnsupportedOpError(f"torch.export could not trace {type(model).__name__} ({type(e).__name__}: "
                                 f"{first}); use DependencyGraph(..., tracer='dispatch'), which records one "
                                 f"eager forward and handles data-dependent shapes") from e


def _values(ep: Any, model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    """Small integer results of every node, from one interpreted run of the exported graph."""
    sig = ep.graph_signature
    state = dict(ep.state_dict)
    consts = dict(getattr(ep, "constants", {}) or {})
    flat_user = flat_tensors(example_inputs)
    feed: list[Any] = []
    users = iter(flat_user)
    for spec in sig.input_specs:
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            feed.append(state[spec.target] if spec.target in state else consts[spec.target])
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            feed.append(consts[spec.target])
        elif kind == "USER_INPUT":
            feed.append(next(users, None))
        else:
            feed.append(None)
    keep: dict[str, torch.Tensor] = {}

    class _Run(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.dtype in _INDEX_DTYPES and out.numel() <= _MAX_VALUES:
                keep[n.name] = out.detach()
            return out

    with torch.no_grad():
        _Run(ep.graph_module).run(*feed)
    return keep


def _module_of(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def trace_model_export(model: nn.Module, example_inputs: Any, mode: str = "eval",
                       counter: list[int] | None = None) -> Trace:
    """Record ``model`` in ``mode`` ('eval' or 'train') with ``torch.export``; same :class:`Trace` as the
    dispatch tracer. Raises UnsupportedOpError naming the model and the export error when export fails.

    The model's train/eval flags and buffers are restored before returning, also on error.

    >>> t = trace_model_export(model, (torch.randn(1, 3, 32, 32),))
    >>> t.ops[0].name
    'aten.convolution'
    """
    counter = counter if counter is not None else [0]
    t0 = time.perf_counter()
    with in_mode(model, mode):
        ep = _export(model, example_inputs)
        values = _values(ep, model, example_inputs)
    owners = _owners(model)
    by_name: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    by_name.update({k: v for k, v in model.named_buffers(remove_duplicate=False) if v is not None})
    sig = ep.graph_signature
    target_of = {spec.arg.name: (spec.kind.name, spec.target) for spec in sig.input_specs
                 if hasattr(spec.arg, "name")}
    nodes: dict[int, Node] = {}
    ids: dict[str, list[int]] = {}   # fx node name -> node ids of its tensor outputs (in order)
    ops: list[OpRecord] = []
    inputs: list[int] = []

    def new(val: Any, kind: str, owner: tuple[str, str] | None = None, name: str = "") -> int:
        nid = counter[0]
        counter[0] += 1
        nodes[nid] = Node(nid, tuple(int(s) for s in val.shape), kind, owner)
        v = values.get(name)
        if v is not None and v.shape == val.shape:
            nodes[nid].value = v.cpu().numpy().copy()
        return nid

    def ref(a: Any, found: list[int]) -> Any:
        if isinstance(a, torch.fx.Node):
            got = ids.get(a.name)
            if not got:
                return None
            found.append(got[0])
            return Ref(got[0])
        if isinstance(a, (list, tuple)):
            return type(a)(ref(x, found) for x in a)
        return a

    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                continue
            kind, target = target_of.get(n.name, ("USER_INPUT", None))
            if kind != "USER_INPUT" and not n.users:
                continue   # export lifts every parameter; like the dispatch tracer, keep only those the forward used
            if kind in ("PARAMETER", "BUFFER") and target in by_name:
                o = owners.get(id(by_name[target]))
                ids[n.name] = [new(val, o[2] if o else kind.lower(), o[:2] if o else None, n.name)]
            elif kind == "USER_INPUT":
                ids[n.name] = [new(val, "input", None, n.name)]
                inputs.append(ids[n.name][0])
            else:
                ids[n.name] = [new(val, "const", None, n.name)]
        elif n.op == "call_function" and n.target is operator.getitem:
            src, i = n.args
            got = ids.get(src.name, [])
            if isinstance(i, int) and i < len(got):
                ids[n.name] = [got[i]]
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            schema = n.target._schema
            found: list[int] = []
            rec_args = []
            for i, sa in enumerate(schema.arguments):
                if i < len(n.args):
                    v = n.args[i]
                elif sa.name in n.kwargs:
                    v = n.kwargs[sa.name]
                else:
                    v = sa.default_value if sa.has_default_value() else None
                rec_args.append(ref(v, found))
            outs = [new(t, "act") for t in flat_tensors(val)]
            if isinstance(val, torch.Tensor) and outs:
                v = values.get(n.name)
                if v is not None and v.shape == val.shape:
                    nodes[outs[0]].value = v.cpu().numpy().copy()
            ids[n.name] = outs
            name = n.target.overloadpacket._qualified_op_name.replace("::", ".")
            ops.append(OpRecord(len(ops), name, n.target._overloadname, rec_args, found, outs, [],
                                _module_of(n), tuple(a.name for a in schema.arguments)))
    user_out = {spec.arg.name for spec in sig.output_specs if spec.kind.name == "USER_OUTPUT"
                and hasattr(spec.arg, "name")}
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_ids = [ids[a.name][0] for a in out_node.args[0] if isinstance(a, torch.fx.Node)
               and a.name in user_out and ids.get(a.name)]
    seconds = time.perf_counter() - t0
    log.debug("exported %s (%s): %d ops in %.3fs", type(model).__name__, mode, len(ops), seconds)
    return Trace(mode, nodes, ops, inputs, out_ids, [nodes[i].shape for i in out_ids], seconds)
