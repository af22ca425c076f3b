"""Fast paths of the recorder, the verification checker, the MAC count and the snapshot (issue 14, speed)
give what the slow ones gave: same records, same pass/fail with the same op and message, same MACs."""

import copy

import pytest
import torch
from torch import nn

from brainsurgeon._state import ModelSnapshot, _deepcopy_fields
from brainsurgeon.graph import DependencyGraph
from brainsurgeon.graph.trace import _schema_of, trace_model
from brainsurgeon.graph.verify import VerifyError, verify_forward
from brainsurgeon.prune import costs


class Two(nn.Module):
    """A Linear, a one-output op (relu), a two-output op (max over dim 0: values and indices), a Linear back."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x).relu()
        return self.fc2(y) + y.max(0)[0].sum()


def _traced():
    torch.manual_seed(0)
    m = Two().eval()
    x = torch.randn(3, 4)
    t = trace_model(m, (x,))
    return m, x, t


def _narrowed(m: Two, keep: int) -> None:
    """Keep the first ``keep`` output rows of fc and input columns of fc2 (what surgery would do)."""
    m.fc.weight.data, m.fc.bias.data = m.fc.weight.data[:keep].clone(), m.fc.bias.data[:keep].clone()
    m.fc2.weight.data = m.fc2.weight.data[:, :keep].clone()


def _removed(t, n: int) -> dict:
    """``n`` entries removed along every width-6 dim of every activation (the plan of removing n fc rows)."""
    return {(o, d): n for op in t.ops for o in op.outputs for d, s in enumerate(t.nodes[o].shape) if s == 6}


def test_schema_lookup_by_id_keeps_the_overload_alive_and_matches_the_schema():
    op = torch.ops.aten.add.Tensor
    name, argnames, defaults, mutated, overload, held, call = _schema_of(op)
    assert (name, argnames, overload) == ("aten.add", ("self", "other", "alpha"), "Tensor") and held is op
    assert call is op._op   # the overload's C++ entry (what OpOverload.__call__ calls), one Python frame less
    x = torch.randn(3)
    assert torch.equal(call(x, x, alpha=2), op(x, x, alpha=2))
    assert defaults == (None, None, 1) and mutated == ()
    assert _schema_of(torch.ops.aten.add_.Tensor)[3] == (0,)   # written in place: self
    assert _schema_of(op) is _schema_of(op)                    # parsed once


def test_checker_passes_a_plan_followed_op_for_op_one_and_two_output_ops():
    m, x, t = _traced()
    _narrowed(m, 4)
    assert verify_forward(m, (x,), t, _removed(t, 2), t.nodes) is True   # every op as planned: exact
    assert verify_forward(m, (x,), t, _removed(t, 2), t.nodes, collect=True) is True


@pytest.mark.parametrize("collect", [False, True])
def test_checker_names_the_first_op_whose_pruned_dim_is_off(collect):
    """A plan that says 3 rows go where 2 went: the first op producing the dim (fc's transposed weight)
    fails, with the op, its index, the sizes and the count in the message; collect mode lists every op."""
    m, x, t = _traced()
    _narrowed(m, 4)
    with pytest.raises(VerifyError) as e:
        verify_forward(m, (x,), t, _removed(t, 3), t.nodes, collect=collect)
    names = [op.name for op in t.ops]
    first = names.index("aten.t")
    assert e.value.op_index == first and e.value.mode == "eval"
    assert str(e.value) == (f"eval-mode check: aten.t (op {first}) produced 4 entries along dim 1, expected 3 after "
                            f"removing 3 (module code with a hard-coded size?); the model was restored")
    if collect:   # one forward finds each failing op: the substitute of op 0 makes addmm raise; fc2's t fails
        assert e.value.op_indices == [0, 1, 3] and [names[i] for i in e.value.op_indices] == ["aten.t", "aten.addmm",
                                                                                               "aten.t"]
        assert e.value.messages[1].startswith("eval-mode forward failed after pruning, in aten.addmm (op 1): "
                                              "RuntimeError")
        assert e.value.messages[2] == ("eval-mode check: aten.t (op 3) produced 4 entries along dim 0, expected 3 "
                                       "after removing 3 (module code with a hard-coded size?); the model was restored")
    else:
        assert e.value.op_indices == [first]


def test_checker_leaves_the_trace_where_an_unplanned_dim_moves():
    """Sizes that moved where the plan removes nothing (not a sized-by-arguments op): the re-run left the
    trace (not exact); only the final output shapes are checked, and they held."""
    m, x, t = _traced()
    _narrowed(m, 4)
    assert verify_forward(m, (x,), t, {}, t.nodes) is False


def test_failing_group_is_still_localised_and_reported():
    """A hard-coded slice of a pruned width: the group fails verification at the slice, the model is left whole."""

    class Hard(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, 4:8])

    torch.manual_seed(0)
    m = Hard().eval()
    x = torch.randn(1, 3, 4, 4)
    ref = m(x)
    g = DependencyGraph(m, (x,))
    grp = g.group("a", "out", [0, 1])
    failed = g.prune([grp], skip_failed=True)
    assert len(failed) == 1 and failed[0][0] is grp
    assert "aten.slice" in failed[0][1] and "the model was restored" in failed[0][1]
    assert m.a.out_channels == 8 and torch.equal(m(x), ref)


def test_mac_cache_gives_the_formulas_counts():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    t = trace_model(m, (torch.randn(2, 3, 8, 8),))
    costs._FLOPS.clear()
    cold = costs.trace_macs(t)
    assert costs._FLOPS   # filled
    assert costs.trace_macs(t) == cold
    assert cold == {"0": 2 * 8 * 6 * 6 * 27, "2": 2 * 8 * 4 * 4 * 72, "4": 2 * 128 * 5}
    removed = {(o, 1): 4 for op in t.ops if op.module == "0" for o in op.outputs}
    removed.update({(n.id, 0): 4 for n in t.nodes.values() if n.owner and n.owner[0] == "0"})
    costs._FLOPS.clear()
    assert costs.trace_macs(t, removed)["0"] == cold["0"] // 2   # shapes less the removed entries
    assert costs._key("aten.mm", [1], []) != costs._key("aten.mm", [1.0], []) != costs._key("aten.mm", [True], [])
    assert costs._key("aten.mm", [{"a": 1}], []) is None   # unhashable: counted, not cached
    keys = [costs._key("aten.mm", a, []) for a in ([(2, 3)], [2, 3], [[2, 3, 4]], [(2, True)], [(2, 1)], [("i", 2)],
                                                   [2.0, 3], [(2, 3), None])]
    assert len(set(keys)) == len(keys)   # shapes, scalars, lists and mixed sequences never share a key
    assert costs._key("aten.mm", [(2, 3)], []) == costs._key("aten.mm", [[2, 3]], [])   # list or tuple: one key


def test_config_snapshot_equals_deepcopy_and_keeps_aliasing():
    class Cfg:
        def __init__(self):
            shared = [1, 2]
            self.hidden_size, self.name, self.ratio, self.flag, self.none = 64, "x", 0.5, True, None
            self.a, self.b, self.d = shared, shared, {"k": [3]}

        def to_dict(self):
            return dict(vars(self))

    c = Cfg()
    got, ref = _deepcopy_fields(c), copy.deepcopy(vars(c))
    assert got == ref and got["a"] is got["b"] and got["a"] is not c.a and got["d"]["k"] is not c.d["k"]

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.fc, self.sizes = c, nn.Linear(2, 2), (2, 2)

    h = Holder()
    snap = ModelSnapshot(h)
    c.hidden_size, c.d["k"][0], h.sizes, h.extra = 32, 9, (1, 1), 1
    snap.restore_()
    assert c.hidden_size == 64 and c.d == {"k": [3]} and h.sizes == (2, 2) and not hasattr(h, "extra")
