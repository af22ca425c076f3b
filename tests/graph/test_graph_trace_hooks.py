"""The tracer names each op's innermost module with two global module hooks held only during the forward
(issue 14, speed): names as before, nothing left registered, also when the forward raises."""

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

from brainsurgeon.graph.trace import trace_model


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + nn.Identity()(x)   # a module outside the model: its caller's name


class Outer(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.a, self.b, self.fail = Inner(), nn.Linear(4, 2), fail

    def forward(self, x):
        h = self.a(x)
        if self.fail:
            raise RuntimeError("boom")
        return self.b(h).sum(1)


def _hooks() -> int:
    return len(module_mod._global_forward_hooks) + len(module_mod._global_forward_pre_hooks)


def test_ops_are_named_by_innermost_module_and_no_hook_is_left():
    n0 = _hooks()
    t = trace_model(Outer(), (torch.randn(3, 4),))
    assert _hooks() == n0
    where = {(op.name, op.module) for op in t.ops}
    assert ("aten.addmm", "a.fc") in where and ("aten.relu", "a") in where and ("aten.add", "a") in where
    assert ("aten.addmm", "b") in where and ("aten.sum", "") in where
    assert sum(op.module == "" for op in t.ops) == 1   # only the root's own sum


def test_hooks_are_removed_when_the_forward_raises():
    n0 = _hooks()
    with pytest.raises(RuntimeError, match="boom"):
        trace_model(Outer(fail=True), (torch.randn(3, 4),))
    assert _hooks() == n0
