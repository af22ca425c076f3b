"""Sizes a user's module keeps in its own int attributes and passes to ``view``/``reshape``.

    h = self.w(x).view(n, self.heads, self.hd)        # GAT written with fixed head sizes

The trace records ``view(h, [12, 4, 8])``; the head atom (4) is prunable only if ``self.heads`` follows.
When exactly one plain int attribute of the module that ran the view equals an explicitly given size
(not ``-1``), that attribute is recorded as mirroring the view's dim (``Edges.module_attr``) and
surgery sets it to the kept size; verification then checks the whole forward as usual. Modules of
torch, transformers, timm and torchvision are left to their fixers; an ambiguous size (two attributes
of that value) is recorded for :func:`explain` so the refusal names it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .rules import Ctx

VIEWS = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.view_copy", "aten._reshape_copy"}
SPLITS = {"aten.split_with_sizes", "aten.split_with_sizes_copy", "aten.unsafe_split_with_sizes"}
LIBRARIES = ("torch.", "torchvision.", "transformers.", "timm.")


def _int_attrs(m: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and type(v) is int and v > 1}


def _user_module(m: Any) -> bool:
    return isinstance(m, nn.Module) and not type(m).__module__.startswith(LIBRARIES)


def record_view_attrs(model: nn.Module, traces: list[Any], g: Ctx) -> dict[tuple[str, int], list[str]]:
    """Record every (module, int attribute) that mirrors an explicit view size; returns the ambiguous ones
    ``{(module, size): [attribute names]}``."""
    mods = dict(model.named_modules())
    ambiguous: dict[tuple[str, int], list[str]] = {}
    seen: set[tuple[str, str, int, int]] = set()
    for t in traces:
        for op in t.ops:
            if op.name in SPLITS and op.outputs and isinstance(mods.get(op.module), nn.Module):
                _record_split_attrs(op, mods[op.module], g, seen)
                continue
            if op.name not in VIEWS or not op.outputs:
                continue
            m = mods.get(op.module)
            if not _user_module(m):
                continue
            ints = _int_attrs(m)
            sizes = op.get("size", op.get("shape"))
            if not ints or not isinstance(sizes, (list, tuple)):
                continue
            out = op.outputs[0]
            if len(g.shape(out)) != len(sizes):
                continue
            for d, s in enumerate(sizes):
                if not isinstance(s, int) or s <= 1:
                    continue
                names = [k for k, v in ints.items() if v == s]
                if len(names) == 1 and (op.module, names[0], out, d) not in seen:
                    seen.add((op.module, names[0], out, d))
                    g.edges.module_attr(op.module, names[0], (g.key(out, d),))
                elif len(names) > 1:
                    ambiguous[(op.module, s)] = names
    return ambiguous


def _record_split_attrs(op: Any, m: nn.Module, g: Ctx, seen: set) -> None:
    """``torch.split(x, self.split_indexes)`` or ``torch.split(x, [self.dim_conv3, self.dim_untouched])`` (timm
    InceptionNeXt, FasterNet; library modules too, as no fixer knows these): one tuple attribute equal to the sizes
    mirrors every piece, else each int attribute equal to exactly one piece's size (and to no other attribute)
    mirrors that piece. Surgery sets what the pieces keep; anything else is left to verification."""
    sizes = op.get("split_sizes")
    if not isinstance(sizes, (list, tuple)) or not all(type(s) is int for s in sizes):
        return
    d = op.get("dim", 0)
    d = d + len(g.shape(op.args[0])) if d < 0 else d
    keys = tuple(g.key(o, d) for o in op.outputs)
    tuples = [k for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, (tuple, list))
              and list(v) == list(sizes)]
    if len(tuples) == 1:
        if (op.module, tuples[0], op.outputs[0], d) not in seen:
            seen.add((op.module, tuples[0], op.outputs[0], d))
            g.edges.module_attr(op.module, tuples[0], keys)
        return
    ints = _int_attrs(m)
    for i, s in enumerate(sizes):
        names = [k for k, v in ints.items() if v == s]
        tag = (op.module, names[0], op.outputs[i], d) if len(names) == 1 else None
        if s > 1 and tag and list(sizes).count(s) == 1 and tag not in seen:
            seen.add(tag)
            g.edges.module_attr(op.module, names[0], (keys[i],))
