"""Function-matching augmentation: every output is a shift/mirror of its input, teacher and student
see the same view, runs are reproducible and paired across the KD and plain arms."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from brainsurgeon.distill import KD, distill, shift_flip
from brainsurgeon.errors import ConfigError


def images(n=16, h=9, w=7, seed=0):
    return torch.rand(n, 2, h, w, generator=torch.Generator().manual_seed(seed))


def candidates(x, s):
    """Every zero-filled translation by (dy, dx) in [-s, s]^2 of x (C, H, W), mirrored or not."""
    _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (s, s, s, s))
    out = []
    for a in range(2 * s + 1):
        for b in range(2 * s + 1):
            v = xp[:, a:a + h, b:b + w]
            out += [v, v.flip(-1)]
    return out


def test_off_is_identity():
    x = images()
    assert torch.equal(shift_flip(x, 0, False), x)


@pytest.mark.parametrize("s,flip", [(1, False), (2, True), (0, True)])
def test_each_output_is_a_shift_or_mirror_of_its_input(s, flip):
    x = images()
    y = shift_flip(x, s, flip, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    for xi, yi in zip(x, y, strict=True):
        allowed = candidates(xi, s) if flip else candidates(xi, s)[::2]
        assert any(torch.equal(yi, c) for c in allowed)


def test_views_vary_and_are_seeded():
    x = images(n=64)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    y1, y2 = shift_flip(x, 2, True, g()), shift_flip(x, 2, True, g())
    assert torch.equal(y1, y2)
    assert sum(not torch.equal(a, b) for a, b in zip(y1, x, strict=True)) > 32  # 49 * 2 - 1 of 50 views change


def test_non_image_batch_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="set shift=0 and flip=False"):
        shift_flip(torch.randn(4, 10), 2, False)


class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return TensorDataset(x, (x[:, 0, :, :4].mean((1, 2)) > x[:, 0, :, 4:].mean((1, 2))).long())


def test_teacher_and_student_see_the_same_augmented_view():
    student, teacher = Net(0), Net(1)
    distill(student, teacher, data(), KD(epochs=1, batch_size=16, shift=2, flip=True))
    assert len(student.seen) == len(teacher.seen) == 4
    assert all(torch.equal(s, t) for s, t in zip(student.seen, teacher.seen, strict=True))


def test_kd_and_plain_arms_see_identical_views_per_seed_and_views_differ_from_data():
    cfg = KD(epochs=2, batch_size=16, shift=1, flip=True, seed=5)
    kd_student, plain_student = Net(0), Net(0)
    distill(kd_student, Net(1), data(), cfg)
    distill(plain_student, None, data(), cfg)
    assert len(kd_student.seen) == len(plain_student.seen) == 8
    assert all(torch.equal(a, b) for a, b in zip(kd_student.seen, plain_student.seen, strict=True))
    raw = data().tensors[0]
    seen = torch.cat(kd_student.seen[:4])  # epoch 1: each image once, in a shuffled order
    assert seen.shape == raw.shape
    unchanged = sum(any(torch.equal(v, r) for r in raw) for v in seen)
    assert unchanged < len(seen) // 4  # 1 of the 18 views is the identity: ~4 of 64 expected


def test_config_round_trip_and_validation():
    from brainsurgeon.config import config_from_dict

    cfg = KD(shift=2, flip=True)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert "aug shift 2+flip" in cfg.describe()
    with pytest.raises(ConfigError, match="KD: shift"):
        KD(shift=-1)
    with pytest.raises(ConfigError, match="KD: flip"):
        KD(flip=1)
