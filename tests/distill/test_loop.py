"""The training loop: structure is preserved, runs are reproducible, nothing leaks."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from brainsurgeon.distill import KD, distill, zero_masks
from brainsurgeon.errors import ConfigError, NumericalError
from brainsurgeon.quant.qat import QAT


class SmallCNN(nn.Module):
    """conv(c1) -> conv(c2) -> linear(h) -> linear(3): widths set to build pruned students."""

    def __init__(self, c1=8, c2=8, h=16):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1)
        self.bn = nn.BatchNorm2d(c2)
        self.fc1, self.fc2 = nn.Linear(c2 * 16, h), nn.Linear(h, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc2(torch.relu(self.fc1(torch.nn.functional.avg_pool2d(h, 2).flatten(1))))


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()  # 3 classes
    return TensorDataset(x, y)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return SmallCNN(**kw)


def sparse_student():
    m = model()
    with torch.no_grad():
        for p in (m.conv2.weight, m.fc1.weight):
            p.masked_fill_(p.abs() < p.abs().flatten().median(), 0.0)  # 50% unstructured
    return m


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_masks_survive_fine_tuning_with_weight_decay():
    m = sparse_student()
    masks = zero_masks(m)
    assert set(masks) == {"conv2.weight", "fc1.weight"}
    before = state(m)
    hist = distill(m, model(1), data(), KD(epochs=2, lr=1e-2, optimizer="adamw", weight_decay=0.1, batch_size=32))
    for name, mask in masks.items():
        w = m.state_dict()[name]
        assert (w[mask] == 0).all() and not torch.equal(w, before[name])  # zeros kept, the rest trained
    assert hist.masked_weights == 2 and hist.masked_zeros == sum(int(v.sum()) for v in masks.values())
    assert hist.steps == 6


def test_pruned_student_keeps_shapes_with_hint_adapters_and_leaves_no_trace():
    teacher, student = model(1).eval(), model(2, c1=5, c2=4, h=9)
    t_before, s_shapes = state(teacher), {k: v.shape for k, v in student.state_dict().items()}
    cfg = KD(epochs=2, batch_size=32, hints=(("conv2", "conv2"), ("fc1", "fc1"), ("conv1", "conv1")))
    hist = distill(student, teacher, data(), cfg)
    assert {k: v.shape for k, v in student.state_dict().items()} == s_shapes
    assert hist.adapters == 3 and hist.periods[-1].hint > 0
    for k, v in teacher.state_dict().items():  # the teacher is untouched (BN statistics included)
        assert torch.equal(v, t_before[k]), k
    assert not teacher.training and student.training
    assert all(p.requires_grad for p in teacher.parameters())
    for m in list(teacher.modules()) + list(student.modules()):
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(not p._backward_hooks for p in student.parameters())


def test_hint_adapter_least_squares_init_is_exact_for_linear_features():
    teacher = model(1).eval()
    student = copy.deepcopy(teacher)  # same features: identity adapters, no parameters
    hist = distill(student, teacher, data(), KD(epochs=1, lr=1e-9, hints=(("conv2", "conv2"),)))
    assert hist.adapters == 0 and hist.periods[0].hint < 1e-10
    from brainsurgeon.distill import ChannelAdapter
    fs = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    A = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    ft = torch.einsum("oc,nchw->nohw", A, fs) + 0.5
    ad = ChannelAdapter(3, 6, dim=1)
    ad.fit_(fs, ft, ridge=0.0)
    torch.testing.assert_close(ad(fs), ft, rtol=1e-4, atol=1e-4)


def test_same_seed_same_weights_other_seed_differs():
    runs = []
    for seed in (0, 0, 1):
        m = sparse_student()
        distill(m, model(1), data(), KD(epochs=1, batch_size=16, seed=seed))
        runs.append(state(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_global_rng_is_left_alone():
    m, d = model(), data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill(m, None, d, KD(epochs=1, batch_size=32))
    assert torch.equal(torch.rand(3), expected)


def test_early_stopping_keeps_best_state_including_the_start():
    m = model()
    start = state(m)
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])  # start is best; every evaluation is worse
    hist = distill(m, None, data(), KD(epochs=5, batch_size=32, eval_every=1, patience=2), val=lambda _: next(scores))
    assert hist.stopped_early and hist.steps == 2 and hist.best_step == 0 and hist.best_metric == 0.9
    assert all(torch.equal(v, start[k]) for k, v in m.state_dict().items())


def test_validation_accuracy_and_best_step():
    m = model()
    hist = distill(m, None, data(), KD(epochs=3, lr=1e-2, batch_size=32), val=data(48, seed=5))
    assert len(hist.periods) == 3 and all(p.val is not None for p in hist.periods)
    assert hist.best_metric >= hist.val_start and "val: start" in hist.to_table()


def test_qat_through_the_loop_ends_on_grid_and_keeps_masks():
    m = sparse_student()
    masks = zero_masks(m)
    hist = distill(m, model(1), data(), KD(epochs=1, batch_size=32, qat=QAT(bits=3)))
    assert set(hist.qat_layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert type(m.conv2) is nn.Conv2d and type(m.fc1) is nn.Linear
    for name in ("conv1", "conv2", "fc1", "fc2"):
        W = getattr(m, name).weight.detach().reshape(getattr(m, name).weight.shape[0], -1)
        assert max(r.unique().numel() for r in W) <= 8, name
    assert all((m.state_dict()[n][k] == 0).all() for n, k in masks.items())


def test_failure_restores_student_and_teacher():
    m, teacher = model(), model(1).train()
    before = state(m)
    bad = TensorDataset(torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(NumericalError, match="lower lr"):
        distill(m, teacher, bad, KD(epochs=1, batch_size=4, qat=QAT(bits=4)))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert type(m.conv1) is nn.Conv2d and teacher.training


@pytest.mark.parametrize("kw,match", [({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"),
                                      ({"optimizer": "lion"}, "optimizer"), ({"hints": (("a",),)}, "hints"),
                                      ({"epochs": 0}, "epochs")])
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ConfigError, match=f"KD: {match}"):
        KD(**kw)


def test_bad_calls():
    with pytest.raises(ConfigError, match="needs a teacher"):
        distill(model(), None, data(), KD(hints=(("conv1", "conv1"),)))
    with pytest.raises(ConfigError, match="not found in the teacher"):
        distill(model(), model(1), data(), KD(hints=(("conv1", "nope"),)))
    with pytest.raises(ConfigError, match="no batches"):
        distill(model(), None, [], KD())
    with pytest.raises(ConfigError, match="one-shot iterator"):
        distill(model(), None, iter([data()[0]]), KD())
    with pytest.raises(ConfigError, match="separate model"):
        m = model()
        distill(m, m, data(), KD())
