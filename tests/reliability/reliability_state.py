"""What "the caller's model is untouched" means, as one comparable record.

`capture(model)` records, per module and per tensor, the objects (by identity) and the values;
`assert_untouched(model, before)` checks the model is bit-identical AND object-identical: same
Module and Parameter objects in the same places, same classes, hooks, train/eval flags,
requires_grad, grads (objects and values) and attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
          "_load_state_dict_pre_hooks")


def capture(model: nn.Module) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(mod).items() if not k.startswith("_") and k != "training"}
        rec[f"module {name}"] = (id(mod), type(mod), mod.training, repr(attrs),
                                 {h: list(getattr(mod, h, {}).values()) for h in _HOOKS},
                                 [(k, id(c)) for k, c in mod._modules.items()])
        for k, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                rec[f"tensor {name}.{k}"] = None
                continue
            g = t.grad
            rec[f"tensor {name}.{k}"] = (id(t), t.detach().clone(), t.requires_grad,
                                         None if g is None else (id(g), g.clone()))
    return rec


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = capture(model)
    assert sorted(after) == sorted(before), "modules or tensors were added or removed"
    for key, b in before.items():
        a = after[key]
        if key.startswith("module"):
            assert a[:4] == b[:4], f"{key}: object, class, flag or attributes changed"
            assert a[4] == b[4], f"{key}: hooks changed"
            assert a[5] == b[5], f"{key}: children changed"
        elif b is None:
            assert a is None, key
        else:
            assert a[0] == b[0], f"{key}: a different Parameter/buffer object"
            assert a[1].dtype == b[1].dtype and a[1].shape == b[1].shape and torch.equal(a[1], b[1]), \
                f"{key}: values changed"
            assert a[2] == b[2], f"{key}: requires_grad changed"
            if b[3] is None:
                assert a[3] is None, f"{key}: grad appeared"
            else:
                assert a[3] is not None and a[3][0] == b[3][0] and torch.equal(a[3][1], b[3][1]), \
                    f"{key}: grad changed"
