from __future__ import annotations

import pytest
import torch
from torch import nn

from brainsurgeon.errors import ConfigError
from brainsurgeon.models import DigitsCNN, MnistCNN, ResNet20, build_model, register_model, registered_models


@pytest.mark.parametrize(("name", "cls", "side", "params"), [
    ("digits-cnn", DigitsCNN, 8, 47_610),
    ("mnist-cnn", MnistCNN, 28, 224_826),
])
def test_builtin_models_run_and_have_exact_sizes(name, cls, side, params):
    model = build_model(name)
    assert isinstance(model, cls)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.rand(3, 1, side, side)).shape == (3, 10)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == ["conv1", "conv2", "conv3", "fc1", "fc2"]


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_model("digits-cnn", seed=1), build_model("digits-cnn", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model("digits-cnn", seed=2)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_unknown_model_lists_the_registered_names():
    expected = r"unknown model 'resnet'.*'digits-cnn', 'fashion-cnn'.*register_model"
    with pytest.raises(ConfigError, match=expected):
        build_model("resnet")


def test_registering_a_taken_name_fails():
    assert registered_models() == ["digits-cnn", "fashion-cnn", "fashion-resnet20", "mnist-cnn", "mnist-resnet20"]
    with pytest.raises(ConfigError, match="already registered"):
        register_model("digits-cnn")(DigitsCNN)


@pytest.mark.parametrize("name", ["mnist-resnet20", "fashion-resnet20"])
def test_resnet20_has_the_cifar_layout(name):
    model = build_model(name)
    assert isinstance(model, ResNet20)
    assert sum(p.numel() for p in model.parameters()) == 272_186  # 0.27M, as in He et al. (CIFAR)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 19  # 19 conv + 1 fc = 20 layers
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
