"""The registry of per-op dependency rules, and the rules for shape ops (elementwise, views, cat, slices).

A rule reads one recorded op and connects the (tensor, dim) keys of its inputs and outputs with
index maps (see ``maps.py``), or blocks dims whose indices it cannot map. An op with no rule blocks
every dim of its tensors — never guessed::

    @register_rule("aten.flip")
    def _flip(op, g):                      # out[i] = x[n - 1 - i] along each flipped dim
        x, out = op.args[0], op.outputs[0]
        ...

Look-ups fall back from an in-place name to its functional one (``aten.add_`` -> ``aten.add``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .maps import Edges, Key
from .trace import Node, OpRecord, Ref

Rule = Callable[[OpRecord, "Ctx"], None]
_RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: use the function as the dependency rule of the ATen ops ``names`` ('aten.add', ...)."""
    def deco(fn: Rule) -> Rule:
        for n in names:
            _RULES[n] = fn
        return fn
    return deco


def find_rule(name: str) -> Rule | None:
    """The rule for op ``name`` (overload packet), falling back from in-place ``x_`` to ``x``."""
    rule = _RULES.get(name)
    if rule is None and name.endswith("_") and not name.endswith("__"):
        rule = _RULES.get(name[:-1])
    return rule


ModuleRule = Callable[[str, object, Callable[[str, str], "int | None"], "Ctx"], None]
_MODULE_RULES: dict[str, ModuleRule] = {}


def register_module_rule(*qualnames: str) -> Callable[[ModuleRule], ModuleRule]:
    """Decorator for ties that live in a module's code, not in its ops (a size computed from another
    tensor's size). ``fn(name, module, node, g)``; ``node(module name, tensor)`` is the traced node id of
    a parameter (None if unused). Keyed by class ``"package.module.Class"``, found along the MRO.
    """
    def deco(fn: ModuleRule) -> ModuleRule:
        for q in qualnames:
            _MODULE_RULES[q] = fn
        return fn
    return deco


def apply_module_rules(model: object, param_nodes: dict[tuple[str, str], list[int]], g: Ctx) -> None:
    """Run the module rule of every submodule of ``model`` whose class (or a base) has one."""
    def node(module: str, tensor: str) -> int | None:
        ids = param_nodes.get((module, tensor))
        return ids[0] if ids else None

    for name, m in model.named_modules():  # type: ignore[attr-defined]
        for cls in type(m).__mro__:
            fn = _MODULE_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
            if fn is not None:
                fn(name, m, node, g)
                break


def registered_rules() -> list[str]:
    """Names of every op with a rule."""
    return sorted(_RULES)


class Ctx:
    """What a rule sees: node shapes and the edge builder, with dim normalisation."""

    def __init__(self, edges: Edges, nodes: dict[int, Node]) -> None:
        self.edges = edges
        self.nodes = nodes

    def shape(self, x: Ref | int) -> tuple[int, ...]:
        return self.nodes[x.node if isinstance(x, Ref) else x].shape

    def value(self, x: Ref | int) -> np.ndarray | None:
        return self.nodes[x.node if isinstance(x, Ref) else x].value

    def key(self, x: Ref | int, dim: int) -> Key:
        nid = x.node if isinstance(x, Ref) else x
        shape = self.nodes[nid].shape
        d = dim + len(shape) if dim < 0 else dim
        k = (nid, d)
        self.edges.size.setdefault(k, shape[d])   # Edges._add
        return k

    def link(self, a: Ref | int, da: int, b: Ref | int, db: int) -> None:
        # ``edges.link(key(a, da), key(b, db))`` with the two keys made inline (most rules' only call)
        nodes, size = self.nodes, self.edges.size
        na = a.node if isinstance(a, Ref) else a
        sa = nodes[na].shape
        ka = (na, da + len(sa) if da < 0 else da)
        size.setdefault(ka, sa[ka[1]])
        nb = b.node if isinstance(b, Ref) else b
        sb = nodes[nb].shape
        kb = (nb, db + len(sb) if db < 0 else db)
        size.setdefault(kb, sb[kb[1]])
        self.edges.link(ka, kb)

    def gather(self, a: Ref | int, da: int, b: Ref | int, db: int, pos: np.ndarray) -> None:
        self.edges.gather(self.key(a, da), self.key(b, db), pos)

    def block(self, x: Ref | int, dims: Iterable[int] | None, reason: str) -> None:
        shape = self.shape(x)
        for d in range(len(shape)) if dims is None else dims:
            self.edges.block(self.key(x, d), reason)

    def module_attr(self, op: OpRecord, attr: str, x: Ref | int, dims: Iterable[int]) -> None:
        """The attribute ``attr`` of the module that ran ``op`` mirrors the sizes of ``x``'s ``dims``."""
        self.edges.module_attr(op.module, attr, tuple(self.key(x, d) for d in dims))

    def inexact(self, x: Ref | int, d: int, reason: str) -> None:
        self.edges.mark_inexact(self.key(x, d), reason)

    def broadcast(self, src: Ref | int, out: Ref | int) -> None:
        """Right-aligned broadcasting: equal-size dims are identical, size-1 dims are free."""
        s, o = self.shape(src), self.shape(out)
        for i in range(1, min(len(s), len(o)) + 1):
            if s[-i] == o[-i] and s[-i] > 1:
                self.link(src, len(s) - i, out, len(o) - i)

    def same(self, a: Ref | int, b: Ref | int) -> None:
        """Link every dim of two equally-shaped tensors."""
        if self.shape(a) == self.shape(b):
            for d in range(len(self.shape(a))):
                self.link(a, d, b, d)


def refs(values: Iterable[object]) -> list[Ref]:
    """The tensor arguments among ``values`` (one level of lists flattened)."""
    out: list[Ref] = []
    for v in values:
        if isinstance(v, Ref):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, Ref))
    return out


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---------------------------------------------------------------- elementwise and friends
ELEMENTWISE = """abs acos acosh add addcdiv addcmul alias asin asinh atan atan2 atanh bitwise_and bitwise_not
bitwise_or bitwise_xor bernoulli ceil celu clamp clamp_max clamp_min clip clone copy cos cosh detach div elu eq erf
erfc erfinv exp exp2 expm1 fill floor floor_divide fmod frac ge gelu gt hardshrink hardsigmoid hardswish hardtanh
isfinite isinf isnan le leaky_relu lerp lift_fresh lift_fresh_copy log log10 log1p log2 log_sigmoid_forward
logical_and logical_not logical_or logical_xor logit lt masked_fill maximum minimum mish mul nan_to_num ne neg
native_dropout normal pow reciprocal relu remainder round rrelu_with_noise rsqrt rsub selu sgn sigmoid sign silu
sin sinh softplus softshrink sqrt square sub tan tanh threshold trunc uniform where xlogy zero _to_copy
bitwise_left_shift bitwise_right_shift float_power heaviside hypot copysign nextafter i0 sinc deg2rad rad2deg
positive conj resolve_conj resolve_neg empty_like zeros_like ones_like full_like rand_like randn_like
randint_like dropout feature_dropout alpha_dropout _conj detach_ contiguous _log_softmax_backward_data
""".split()


@register_rule(*[f"aten.{n}" for n in ELEMENTWISE])
def _elementwise(op: OpRecord, g: Ctx) -> None:
    """Elementwise with broadcasting: every input dim of the output's size is that output dim."""
    ins = refs(op.args)
    for out in op.outputs:
        for x in ins:
            g.broadcast(x, out)
    if op.name == "aten.where" and len(ins) == 1:  # where(cond) = nonzero: data-dependent
        g.block(ins[0], None, "aten.where(cond) (data-dependent)")
        for out in op.outputs:
            g.block(out, None, "aten.where(cond) (data-dependent)")


FACTORIES = """zeros ones full empty empty_strided scalar_tensor rand randn randint randperm new_zeros new_ones
new_full new_empty new_empty_strided zeros_like_ empty_permuted""".split()


@register_rule(*[f"aten.{n}" for n in FACTORIES])
def _factory(op: OpRecord, g: Ctx) -> None:
    """Constant-content tensors: their dims are free (sizes come from the caller's code)."""


@register_rule("aten._assert_async", "aten._assert_scalar", "aten._assert_tensor_metadata",
               "aten.record_stream", "aten._functional_assert_async", "aten.sym_constrain_range_for_size")
def _no_effect(op: OpRecord, g: Ctx) -> None:
    """Checks with no tensor result."""


@register_rule("aten._local_scalar_dense", "aten.item")
def _item(op: OpRecord, g: Ctx) -> None:
    """``t.item()``: reads the value of a one-element tensor (every dim size 1: nothing to couple); a larger
    tensor raises in torch before it is recorded."""


@register_rule("aten.arange", "aten.linspace", "aten.logspace", "aten.eye")
def _position_dependent_factory(op: OpRecord, g: Ctx) -> None:
    for out in op.outputs:
        g.block(out, None, f"{op.name} (values depend on positions)")


@register_rule("aten._prelu_kernel", "aten.prelu")
def _prelu(op: OpRecord, g: Ctx) -> None:
    x, w = op.args[0], op.args[1]
    out = op.outputs[0]
    g.same(x, out)
    if len(g.shape(w)) == 1 and g.shape(w)[0] > 1 and len(g.shape(x)) >= 2:
        g.link(w, 0, x, 1)


@register_rule("aten.glu")
def _glu(op: OpRecord, g: Ctx) -> None:
    """glu(x, dim): out[j] = x[j] * sigmoid(x[j + n]); both halves map to j."""
    x, out = op.args[0], op.outputs[0]
    d = _dim(op.get("dim", -1), len(g.shape(x)))
    n = g.shape(out)[d]
    for i in range(len(g.shape(x))):
        if i != d:
            g.link(x, i, out, i)
    g.gather(x, d, out, d, np.arange(2 * n) % n)
