"""Record one eager forward at the ATen level: ops, tensors, shapes, and which module owns each parameter.

A :class:`TorchDispatchMode` sees every ATen op that runs, including ``.detach()`` and no-grad paths and
data-dependent code (detection heads), at the cost of one ordinary forward::

    >>> t = trace_model(model, (torch.randn(1, 3, 32, 32),))
    >>> t.ops[0].name, t.nodes[t.ops[0].outputs[0]].shape
    ('aten.convolution', (1, 16, 32, 32))

Each tensor value is a *node* (id, shape, kind); an in-place op produces a new node for the mutated
tensor, so the recorded program is in SSA form. Parameters and buffers are mapped to
``(module name, attribute)`` by identity.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from .._log import get_logger

log = get_logger(__name__)

def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors inside nested tuples/lists/dicts (and dataclass-like model outputs), in order.

    A hand-rolled walk: torch's generic pytree is ~100x slower per call, which matters once per op.
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flat_tensors(v)]
    if hasattr(obj, "to_tuple"):   # transformers ModelOutput
        return flat_tensors(obj.to_tuple())
    return []


def _map(fn: Any, obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        if hasattr(obj, "_fields"):
            return obj
        if all(type(v) is int for v in obj):   # sizes, dims: fn leaves ints as they are
            return type(obj)(obj)
        return type(obj)(_map(fn, v) for v in obj)
    return fn(obj)


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_INDEX_SET = frozenset(_INDEX_DTYPES)
_MAX_VALUES = 1 << 16


@dataclass(slots=True)
class Node:
    """One tensor value: ``kind`` is 'param', 'buffer', 'input', 'act' (an op output) or 'const'."""

    id: int
    shape: tuple[int, ...]
    kind: str
    owner: tuple[str, str] | None = None  # (module name, attribute) for params and buffers
    value: Any = None                     # numpy copy of small integer/bool tensors (index arguments)
    dtype: torch.dtype | None = None


@dataclass(slots=True)
class OpRecord:
    """One ATen op: its name (overload packet, e.g. 'aten.add'), tensor inputs/outputs and all arguments.

    ``args`` holds every schema argument by position (defaults filled in, lists kept), with tensors
    replaced by :class:`Ref`, so rules read scalars (dims, sizes, groups) and tensors alike.
    """

    index: int
    name: str
    overload: str
    args: list[Any]
    inputs: list[int]
    outputs: list[int]
    mutated: list[int] = field(default_factory=list)  # node ids of inputs that were written in place
    module: str = ""                                  # innermost module whose forward ran the op
    argnames: tuple[str, ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        """The argument called ``name`` (schema name), or ``default``."""
        try:
            v = self.args[self.argnames.index(name)]
        except ValueError:
            return default
        return default if v is None else v


@dataclass(frozen=True)
class Ref:
    """A tensor argument of an op: the node id."""

    node: int


@dataclass
class Trace:
    """The recorded program of one forward (``mode`` 'eval' or 'train')."""

    mode: str
    nodes: dict[int, Node]
    ops: list[OpRecord]
    inputs: list[int]
    outputs: list[int]
    output_shapes: list[tuple[int, ...]]
    seconds: float


class _Recorder(TorchDispatchMode):
    """Dispatch mode that appends an :class:`OpRecord` per op.

    Tensors are identified by ``id()``; a weak reference drops the id when the tensor dies (before
    CPython can reuse it), so activations are freed as in a plain forward instead of kept alive.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False   # no torch.compile inside; skipping the per-op dynamo guard makes recording ~3x cheaper

    def __init__(self, owners: dict[int, tuple[str, str, str]], next_id: list[int], stack: list[str]) -> None:
        super().__init__()
        self.owners = owners          # id(tensor) -> (module, attr, 'param'|'buffer')
        self.next_id = next_id        # shared counter so two traces of one graph never collide
        self.stack = stack            # module-name stack maintained by forward hooks
        self.ids: dict[int, int] = {}  # id(tensor) -> current node id, for live tensors
        self.refs: dict[int, weakref.ref] = {}
        self.nodes: dict[int, Node] = {}
        self.ops: list[OpRecord] = []

    def node_of(self, t: torch.Tensor, kind: str = "const") -> int:
        key = id(t)
        if key in self.ids:
            return self.ids[key]
        nid = self.next_id[0]
        self.next_id[0] += 1
        owner = self.owners.get(key)
        if owner is not None:
            kind = owner[2]
        self.nodes[nid] = Node(nid, tuple(t.shape), kind, owner[:2] if owner else None, dtype=t.dtype)
        self._track(t, nid)
        if t.dtype in _INDEX_SET and t.numel() <= _MAX_VALUES:
            self.nodes[nid].value = t.detach().cpu().numpy().copy()
        return nid

    def _track(self, t: torch.Tensor, nid: int) -> None:
        key = id(t)
        if key not in self.ids:
            ids, refs = self.ids, self.refs

            def gone(_ref: weakref.ref, key: int = key) -> None:
                ids.pop(key, None)
                refs.pop(key, None)

            refs[key] = weakref.ref(t, gone)
        self.ids[key] = nid

    def _mutate_base(self, view: torch.Tensor) -> None:
        """A write into a view changes its base: record it as an op with no rule (blocks both)."""
        base = view._base
        old = self.ids[id(base)]
        vid = self.ids[id(view)]
        new = self.new_node(base)
        self.ops.append(OpRecord(len(self.ops), "brainsurgeon.write_into_view", "", [Ref(old), Ref(vid)],
                                 [old, vid], [new], [old], self.stack[-1] if self.stack else "", ("base", "view")))

    def new_node(self, t: torch.Tensor) -> int:
        nid = self.next_id[0]
        self.next_id[0] = nid + 1
        self.nodes[nid] = Node(nid, tuple(t.shape), "act", None, None, t.dtype)
        key = id(t)
        ids = self.ids
        if key not in ids:
            refs = self.refs

            def gone(_ref: weakref.ref, key: int = key) -> None:
                ids.pop(key, None)
                refs.pop(key, None)

            refs[key] = weakref.ref(t, gone)
        ids[key] = nid
        return nid

    def _ref(self, a: Any, inputs: list[int]) -> Any:
        if isinstance(a, torch.Tensor):
            nid = self.ids.get(id(a))
            if nid is None:
                nid = self.node_of(a)
            inputs.append(nid)
            return Ref(nid)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name, argnames, defaults, mutated_pos, overload, _, call = _SCHEMAS.get(id(func)) or _schema_of(func)
        out = call(*args, **kwargs) if kwargs else call(*args)
        inputs: list[int] = []
        ids, tensor = self.ids, torch.Tensor
        n_args = len(args)
        # every schema argument by position: the call's own, then keywords or defaults (never tensors)
        rec_args = list(args) if n_args == len(argnames) else \
            [*args, *(kwargs.get(a, defaults[i]) for i, a in enumerate(argnames[n_args:], n_args))] if kwargs \
            else [*args, *defaults[n_args:]]
        for i, v in enumerate(rec_args if kwargs else args):
            tv = type(v)
            if tv in _SCALARS:   # None, int, float, bool: recorded as they are
                continue
            if isinstance(v, tensor):                                # _ref(v), inline (one call per op input)
                nid = ids.get(id(v))
                if nid is None:
                    nid = self.node_of(v)
                inputs.append(nid)
                rec_args[i] = Ref(nid)
            elif isinstance(v, (list, tuple)):
                rec_args[i] = _map(lambda x: self._ref(x, inputs), v)
        mutated_views = None
        mutated_objs: dict[int, torch.Tensor] | None = None
        if mutated_pos:
            mutated_objs = {}
            for i in mutated_pos:
                v = args[i] if i < n_args else (kwargs or {}).get(argnames[i])
                if isinstance(v, tensor):
                    mutated_objs[id(v)] = v
            mutated_views = [t for k, t in mutated_objs.items()
                             if k in ids and t._is_view() and id(t._base) in ids] if mutated_objs else None
        outputs, mutated = [], []
        flat = [out] if isinstance(out, tensor) else flat_tensors(out)
        index_outs = None
        for o in flat:
            k = id(o)
            if k in ids or (mutated_objs is not None and k in mutated_objs):
                mutated.append(ids.get(k, -1))
            outputs.append(self.new_node(o))
            if o.dtype in _INDEX_SET:
                index_outs = [o] if index_outs is None else [*index_outs, o]
        self.ops.append(OpRecord(len(self.ops), name, overload, rec_args, inputs, outputs, mutated,
                                 self.stack[-1] if self.stack else "", argnames))
        if index_outs is not None:
            for o in index_outs:
                if o.numel() <= _MAX_VALUES:
                    self.nodes[ids[id(o)]].value = o.detach().cpu().numpy().copy()
        if mutated_views:
            for v_in in mutated_views:
                self._mutate_base(v_in)
        return out


_SCHEMAS: dict[int, tuple[str, tuple[str, ...], tuple[Any, ...], tuple[int, ...], str, Any, Any]] = {}
_SCALARS = frozenset((type(None), int, float, bool))


def _schema_of(func: Any) -> tuple[str, tuple[str, ...], tuple[Any, ...], tuple[int, ...], str, Any, Any]:
    """(name 'aten.add', argument names, defaults (None where none), positions written in place, overload
    name, the overload, what to call it through) of an op overload; parsed once per overload, since reading
    ``func._schema`` costs more than most ops. Keyed by ``id(func)`` (an OpOverload's own ``__hash__`` is
    Python code); the entry holds the overload, so the id is never reused while it is cached. The callable is
    the overload's C++ entry point (``OpOverload.__call__`` does only that, for an overload without a Python
    dispatcher), saving a Python frame per op."""
    got = _SCHEMAS.get(id(func))
    if got is None:
        args = func._schema.arguments
        got = _SCHEMAS[id(func)] = (
            func.overloadpacket._qualified_op_name.replace("::", "."),
            tuple(a.name for a in args),
            tuple(a.default_value if a.has_default_value() else None for a in args),
            tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write),
            func._overloadname, func,
            func._op if getattr(func, "_pyobj_dispatcher", None) is None and hasattr(func, "_op") else func)
    return got


def _owners(model: nn.Module, named: list[tuple[str, nn.Module]] | None = None) -> dict[int, tuple[str, str, str]]:
    """id(tensor) -> (module, attribute, 'param'|'buffer'); ``named``: ``model.named_modules(remove_duplicate=False)``
    when the caller has walked it already."""
    owners: dict[int, tuple[str, str, str]] = {}
    for mname, m in named if named is not None else model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():   # the module's own (recurse=False), without a walk per module
            if p is not None:
                owners.setdefault(id(p), (mname, pname, "param"))
        for bname, b in m._buffers.items():
            if b is not None:
                owners.setdefault(id(b), (mname, bname, "buffer"))
    return owners


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on example inputs: a tuple is splatted, a dict is passed as keywords."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(*_as_tuple(example_inputs))


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` (the same modules, same order), without building every module's name."""
    if type(model).named_modules is not nn.Module.named_modules:
        return list(model.modules())
    out: list[nn.Module] = []
    seen: set[int] = set()

    def walk(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        out.append(m)
        for c in m._modules.values():
            if c is not None:
                if type(c).named_modules is not nn.Module.named_modules:   # a custom walk: ask it
                    for sub in c.modules():
                        if id(sub) not in seen:
                            seen.add(id(sub))
                            out.append(sub)
                else:
                    walk(c)

    walk(model)
    return out


def _plain_flag(cls: type) -> bool:
    """Whether ``m.training = v`` on a ``cls`` instance only stores v in its ``__dict__`` (no custom
    ``__setattr__``, no class attribute or property named ``training``)."""
    return cls.__setattr__ is nn.Module.__setattr__ and not hasattr(cls, "training")


def set_flag(m: nn.Module, flag: bool) -> None:
    """``m.training = flag`` (this module only)."""
    if _plain_flag(type(m)):
        m.__dict__["training"] = flag
    else:
        m.training = flag


def _hf_train(fn: Any) -> bool:
    """Whether ``fn`` is transformers' ``PreTrainedModel.train``: ``nn.Module.train`` plus a kernel-mode
    switch that only runs on a model whose hub kernels are on (``model.use_kernels``)."""
    return getattr(fn, "__qualname__", "") == "PreTrainedModel.train" and \
        getattr(fn, "__module__", "") == "transformers.modeling_utils"


def set_training(m: nn.Module, flag: bool) -> None:
    """``m.train(flag)``: a module that overrides ``train`` is asked (it may reset caches, timm LeViT); the
    flag of every other one is written directly, without ``nn.Module.__setattr__``'s lookups. An HF model
    without hub kernels counts as not overriding it (its override then does only what ``nn.Module.train`` does)."""
    train = type(m).train
    if (train is not nn.Module.train and not (_hf_train(train) and not getattr(m, "_use_kernels", False))) \
            or not _plain_flag(type(m)):
        m.train(flag)
        return
    m.__dict__["training"] = flag
    seen: set[int] = set()
    for c in m._modules.values():   # nn.Module.train walks children(): distinct direct children
        if c is not None and id(c) not in seen:
            seen.add(id(c))
            set_training(c, flag)


@contextlib.contextmanager
def in_mode(model: nn.Module, mode: str, keep_buffers: bool = True) -> Iterator[None]:
    """Run the block with ``model`` in ``mode`` ('eval' or 'train'); on exit, also on error, restore
    every module's train/eval flag and, with `keep_buffers`, every buffer (a train-mode forward
    updates BatchNorm statistics).

    >>> with in_mode(model, "train"):
    ...     model(x)
    """
    was_training = [(m, m.training) for m in modules_of(model)]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if keep_buffers else []
    try:
        set_training(model, mode == "train")   # always: some modules reset caches in train() (timm LeViT's biases)
        yield
    finally:
        for m, flag in was_training:
            if m.training != flag:
                set_flag(m, flag)
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)


def trace_model(model: nn.Module, example_inputs: Any, mode: str = "eval",
                next_id: list[int] | None = None) -> Trace:
    """Record one forward of ``model`` in ``mode`` ('eval' or 'train') without gradients.

    The model's train/eval flag and, after a train-mode forward, its buffers (BatchNorm running
    statistics) are restored before returning, also on error.

    >>> t = trace_model(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    >>> [op.name for op in t.ops]
    ['aten.t', 'aten.addmm', 'aten.relu']
    """
    counter = next_id if next_id is not None else [0]
    named = list(model.named_modules(remove_duplicate=False))   # one walk for owners, names and hooks
    owners = _owners(model, named)
    stack: list[str] = []
    names = {id(m): n for n, m in named}

    def pre(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(mod), stack[-1] if stack else ""))

    def post(_mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    rec = _Recorder(owners, counter, stack)
    # two global module hooks for the duration of the forward (removed in ``finally``) instead of two per
    # module: registering and removing 2 x (number of modules) hooks cost more than recording a small model.
    # A module outside ``model`` (built inside forward) keeps its caller's name, as without hooks.
    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]
    t0 = time.perf_counter()
    try:
        # buffers change only in train mode (BatchNorm statistics), as in verification: snapshot them only then
        with in_mode(model, mode, keep_buffers=mode == "train"):
            flat_in = flat_tensors(example_inputs)
            in_ids = [rec.node_of(a, "input") for a in flat_in]
            with torch.no_grad(), rec:
                out = run_model(model, example_inputs)
            flat_out = flat_tensors(out)
            out_ids = [rec.ids[id(o)] if id(o) in rec.ids else rec.node_of(o) for o in flat_out]
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    log.debug("traced %s (%s): %d ops in %.3fs", type(model).__name__, mode, len(rec.ops), seconds)
    return Trace(mode, rec.nodes, rec.ops, in_ids, out_ids, [tuple(o.shape) for o in flat_out], seconds)


def output_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor in the model's output (flattened), from one no-grad forward."""
    with torch.no_grad():
        out = run_model(model, example_inputs)
    return [tuple(o.shape) for o in flat_tensors(out)]
