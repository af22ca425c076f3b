"""Fast paths of a prune (issue 14, speed) give what the slow ones gave: the per-class fixer lookup, the
train/eval flag walk, the module walk, the snapshot of empty containers and the HF child lookup."""

import numpy as np
import pytest
import torch
from torch import nn

from brainsurgeon._state import ModelSnapshot
from brainsurgeon.graph import hf, surgery
from brainsurgeon.graph.trace import in_mode, modules_of, set_training


class Resets(nn.Module):
    """Overrides train() (like timm LeViT's attention, which drops a cache there)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.calls: list[bool] = []

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(3, 3)
        self.a, self.b, self.r = shared, shared, Resets()   # one module under two names
        self.seq = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), None)

    def forward(self, x):
        return self.seq[0](self.r.fc(self.a(x)))


def _flags(m: nn.Module) -> list[bool]:
    return [s.training for s in m.modules()]


def test_modules_of_is_modules_in_order():
    net = Net()
    assert [id(m) for m in modules_of(net)] == [id(m) for m in net.modules()]


def test_set_training_matches_train_and_asks_overriding_modules():
    for flag in (False, True):
        ref, net = Net(), Net()
        ref.seq[1].train(not flag)      # mixed flags before
        net.seq[1].train(not flag)
        ref.train(flag)
        net.r.calls.clear()
        set_training(net, flag)
        assert _flags(net) == _flags(ref)
        assert net.r.calls == [flag]   # the override ran (once), so its side effects happen as with train()


def test_in_mode_restores_mixed_flags_and_buffers():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    net.eval()
    net[2].train()
    before, mean = _flags(net), net[1].running_mean.clone()
    with in_mode(net, "train"):
        assert all(_flags(net))
        net(torch.randn(5, 3))
    assert _flags(net) == before
    assert torch.equal(net[1].running_mean, mean)


def test_find_fixer_cache_follows_registration():
    class MyConv(nn.Conv2d):
        pass

    assert surgery.find_fixer(MyConv(2, 2, 1)) is surgery._conv
    seen: list[str] = []

    @surgery.register_fixer(MyConv)
    def _mine(m, removed):   # registered after a lookup: the cached answer must not stick
        seen.append("mine")

    try:
        assert surgery.find_fixer(MyConv(2, 2, 1)) is _mine
    finally:
        del surgery._FIXERS[MyConv]
        surgery._FOUND.clear()
    assert surgery.find_fixer(MyConv(2, 2, 1)) is surgery._conv


def test_snapshot_restores_emptied_and_filled_containers():
    net = Net()
    h = net.a.register_forward_hook(lambda *a: None)   # a non-empty hook dict
    snap = ModelSnapshot(net)
    h.remove()                                          # emptied after the snapshot
    net.b.register_forward_pre_hook(lambda *a: None)    # (same module) filled after it
    net.seq[0].register_forward_hook(lambda *a: None)   # an empty one filled
    snap.restore_()
    assert len(net.a._forward_hooks) == 1 and len(net.a._forward_pre_hooks) == 0
    assert len(net.seq[0]._forward_hooks) == 0


class Odd(nn.Module):
    """Children found through a custom __getattr__ and through a class property."""

    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleDict({"query": nn.Linear(2, 2)})
        self.key = nn.Parameter(torch.zeros(2))   # a parameter named like a child: never a child

    def __getattr__(self, name):
        if name == "q_proj":
            return self.inner["query"]
        return super().__getattr__(name)


class Prop(nn.Module):
    def __init__(self):
        super().__init__()
        self._v = nn.Linear(2, 3)

    @property
    def value(self):
        return self._v


def _reference_child(m, names):
    for n in names:
        c = hf._attr(m, n)
        if isinstance(c, nn.Module) and hasattr(c, "weight"):
            return c
    return None


def test_hf_child_lookup_matches_attribute_lookup():
    mods = [Odd(), Prop(), nn.Linear(2, 2), nn.MultiheadAttention(4, 2), Net()]
    for m in mods:
        for names in (hf.Q_NAMES, hf.K_NAMES, hf.V_NAMES, hf._UP, hf._DOWN, hf._FUSED_QKV, ("a", "seq", "r")):
            assert hf._child(m, names) is _reference_child(m, names)
    assert hf._child(Odd(), hf.Q_NAMES) is not None and hf._child(Prop(), hf.V_NAMES) is not None


def test_select_refuses_duplicate_rows_and_keeps_order():
    import pytest

    from brainsurgeon.errors import ConfigError
    from brainsurgeon.graph import DependencyGraph

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    grp = DependencyGraph(model, torch.randn(2, 4)).group(model[0], "out", range(6))
    with pytest.raises(ConfigError, match="rows must be distinct"):
        grp.select([1, 3, 1])
    sub = grp.select([4, 0, 2])
    assert sub.n == 3 and sub.root.idxs.reshape(-1).tolist() == [4, 0, 2]


def test_recorder_keeps_every_argument_scalars_lists_and_tensors():
    """The recorder's inline argument handling records what the generic walk did: scalars and int lists
    as values (lists copied, not the caller's object), tensors and tensor lists as node refs in order."""
    from brainsurgeon.graph.trace import Ref, trace_model

    class M(nn.Module):
        def forward(self, x, y):
            a = x.view(2, -1).permute(1, 0)
            b = torch.cat([a, y.t()], 1)
            return torch.nn.functional.pad(b, [1, 2]) * 0.5 + b.sum(1, keepdim=True)

    t = trace_model(M(), (torch.randn(2, 3, 4), torch.randn(2, 12)))
    ops = {op.name: op for op in t.ops}
    assert ops["aten.view"].args[1] == [2, -1] and type(ops["aten.view"].args[1]) is list
    assert ops["aten.permute"].args[1] == [1, 0]
    cat = ops["aten.cat"]
    assert [type(r) for r in cat.args[0]] == [Ref, Ref] and cat.args[1] == 1
    assert cat.inputs == [r.node for r in cat.args[0]]
    assert ops["aten.constant_pad_nd"].args[1:] == [[1, 2], 0]
    assert ops["aten.mul"].args[1] == 0.5 and ops["aten.sum"].args[1:] == [[1], True, None]
    assert all(isinstance(a, Ref) == (i in (0,)) for i, a in enumerate(ops["aten.mul"].args))


def test_set_training_on_hf_models_matches_train_and_asks_kernel_models():
    """An HF model without hub kernels gets its flags written directly (its train() override does only what
    nn.Module.train does then); one with kernels on is asked, so its kernel mode follows."""
    import pytest
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    ref, net = tf.BertForSequenceClassification(cfg), tf.BertForSequenceClassification(cfg)
    for flag in (False, True, False):
        ref.train(flag)
        set_training(net, flag)
        assert _flags(net) == _flags(ref) == [flag] * len(_flags(ref))
    asked: list[bool] = []
    net._use_kernels = True
    net.train = lambda mode=True: asked.append(mode)   # stands in for the kernel-mode switch
    set_training(net, True)
    assert asked == [True]


def test_rebuild_comparison_is_the_state_dicts():
    """hf._state_bytes is the bytes of state_dict()'s tensors (shared modules under both names, non-persistent
    buffers left out); hf._differing lists the keys both state dicts have with other shapes, in state-dict order
    (keys only one has passed over); both give up (None / False) where a module customises its state dict."""
    def nets():
        net = Net()
        net.register_buffer("scratch", torch.zeros(2), persistent=False)
        net.seq.register_buffer("kept", torch.zeros(3))
        return net
    net, other = nets(), nets()
    sd = net.state_dict()
    assert hf._state_bytes(net) == sum(v.numel() * v.element_size() for v in sd.values())
    other.seq[0].weight = nn.Parameter(torch.zeros(4, 3))
    other.a.bias = nn.Parameter(torch.zeros(5))              # shared: a.bias and b.bias
    other.register_buffer("scratch", torch.zeros(7))          # persistent in other only: not a key of net
    other.seq.kept = torch.zeros(1)
    del other.r.fc                                            # keys only net has
    bad: list[str] = []
    assert hf._differing(net, other, "", bad)
    want, have = other.state_dict(), net.state_dict()
    assert bad == [k for k, v in have.items() if k in want and want[k].shape != v.shape] == \
        ["a.bias", "b.bias", "seq.kept", "seq.0.weight"]
    net.r.fc.register_state_dict_post_hook(lambda *a: None)
    assert hf._state_bytes(net) is None and not hf._differing(net, other, "", [])
    assert not hf._differing(other, net, "", [])   # the customised module is only in the second model


def test_apply_plan_shares_one_removal_set_between_tensors():
    """Tensors with the same size and removed indices (one hidden-size group) are sliced from one shared,
    read-only set: every tensor keeps the right rows, every fixer sees the removed indices, undo restores all;
    an index out of range still fails, naming the tensor."""
    from brainsurgeon.errors import SurgeryError
    from brainsurgeon.graph.surgery import apply_plan, undo_plan

    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    owners = {id(p): [(n.rpartition(".")[0], n.rpartition(".")[2])] for n, p in net.named_parameters()}
    gone = np.array([1, 4])
    plan = {("0", "weight", 0): gone, ("0", "bias", 0): gone.copy(), ("1", "weight", 0): gone.copy(),
            ("1", "bias", 0): gone.copy(), ("2", "weight", 1): gone.copy()}
    undo = apply_plan(net, plan, owners)
    keep = [0, 2, 3, 5]
    assert torch.equal(net[0].weight, before["0.weight"][keep]) and torch.equal(net[1].bias, before["1.bias"][keep])
    assert torch.equal(net[2].weight, before["2.weight"][:, keep])
    assert (net[0].out_features, net[1].normalized_shape, net[2].in_features) == (4, (4,), 4)
    undo_plan(undo)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and net[2].in_features == 6
    with pytest.raises(SurgeryError, match="out of range for dim 0 of size 6"):
        apply_plan(net, {("0", "weight", 0): np.array([1]), ("1", "weight", 0): np.array([6])}, owners)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_distinct_walk_is_named_modules():
    """graph._distinct gives model.named_modules() (first name of each module, same order) from the walk without
    duplicate removal, also when shared modules sit inside shared modules; a class with its own named_modules
    is asked directly."""
    from brainsurgeon.graph.graph import _distinct

    inner = nn.Linear(2, 2)
    block = nn.Sequential(inner, nn.ReLU(), inner)
    net = nn.Sequential(nn.Sequential(block, nn.Linear(2, 2)), block, nn.ModuleDict({"x": inner, "y": Net()}))
    for m in (net, Net(), block, nn.Linear(1, 1)):
        named = list(m.named_modules(remove_duplicate=False))
        assert [(n, id(x)) for n, x in _distinct(m, named)] == [(n, id(x)) for n, x in m.named_modules()]

    class Custom(nn.Sequential):
        def named_modules(self, *a, **k):
            yield "only", self

    c = nn.Sequential(Custom(nn.Linear(1, 1)))
    assert [n for n, _ in _distinct(c, list(c.named_modules(remove_duplicate=False)))] == \
        [n for n, _ in c.named_modules()]


def test_undo_gives_hf_modules_back_the_models_config_object():
    """A prune that is undone leaves every HF module that held the model's config holding that same object
    (module_attrs keeps config objects by reference; a copy put back would stop following config updates)."""
    tf = pytest.importorskip("transformers")
    from brainsurgeon.graph import DependencyGraph

    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    net = tf.BertModel(cfg).eval()
    holders = [n for n, x in net.named_modules() if getattr(x, "config", None) is net.config]
    assert "encoder.layer.0.attention.self" in holders
    g = DependencyGraph(net, {"input_ids": torch.randint(0, 64, (1, 8))})
    grp = g.group("encoder.layer.0.attention.self.query", "out", list(range(8)))   # one whole head
    record = g._prune([grp])
    assert net.encoder.layer[0].attention.self.num_attention_heads == 1
    g._rollback(record)
    assert net.encoder.layer[0].attention.self.num_attention_heads == 2
    assert all(net.get_submodule(n).config is net.config for n in holders)
