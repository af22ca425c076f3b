"""Small built-in CNNs for the demo and the tests, and the model registry.

    >>> model = build_model("digits-cnn")
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> registered_models()
    ['digits-cnn', 'fashion-cnn', 'fashion-resnet20', 'mnist-cnn', 'mnist-resnet20']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

_MODELS: dict[str, Callable[[], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: make a zero-argument model builder (a class or function) available by `name`.

    >>> @register_model("tiny-mlp")
    ... class TinyMLP(nn.Sequential):
    ...     def __init__(self):
    ...         super().__init__(nn.Flatten(), nn.Linear(64, 10))
    """

    def deco(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _MODELS:
            raise ConfigError(f"model name {name!r} is already registered; pick another name")
        _MODELS[name] = builder
        return builder

    return deco


def registered_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_MODELS)


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A freshly initialised built-in model (in train mode); `seed` makes the init reproducible
    without touching the global RNG.

    >>> a, b = build_model("digits-cnn", seed=0), build_model("digits-cnn", seed=0)
    >>> torch.equal(a.fc2.weight, b.fc2.weight)
    True
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; built-in models: {registered_models()}. "
                          f"Add one with @register_model('name') in brainsurgeon/models/cnn.py")
    if seed is None:
        return _MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODELS[name]()


class _ConvBN(nn.Module):
    """Three conv+BN+ReLU layers and two linear layers with readable names (conv1..3, bn1..3, fc1..2)."""

    def __init__(self, channels: tuple[int, int, int, int], padding: int, flat: int, hidden: int,
                 num_classes: int) -> None:
        super().__init__()
        c0, c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(c0, c1, 3, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=padding, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=padding, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc1 = nn.Linear(flat, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)


@register_model("digits-cnn")
class DigitsCNN(_ConvBN):
    """A CNN for the 8x8 sklearn digits: 3 conv+BN layers and 2 linear layers, 47.6k params.

    Shapes: (N, 1, 8, 8) -> conv1 (N, 16, 8, 8) -> conv2 (N, 32, 8, 8) -> pool (N, 32, 4, 4)
    -> conv3 (N, 32, 4, 4) -> flatten (N, 512) -> fc1 (N, 64) -> fc2 (N, 10).

    >>> DigitsCNN()(torch.zeros(1, 1, 8, 8)).shape
    torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__((1, 16, 32, 32), padding=1, flat=32 * 4 * 4, hidden=64, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (N, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)  # (N, 32, 4, 4)
        h = F.relu(self.bn3(self.conv3(h))).flatten(1)  # (N, 32, 4, 4) -> (N, 512)
        return self.fc2(F.relu(self.fc1(h)))


@register_model("mnist-cnn")
class MnistCNN(_ConvBN):
    """A CNN for 28x28 MNIST: 3 conv+BN layers and 2 linear layers, 225k params, 2.1M MACs.

    Most parameters sit in fc1, most compute in the convs. Shapes: (N, 1, 28, 28) -> conv1
    (N, 16, 28, 28) -> pool (N, 16, 14, 14) -> conv2 (N, 32, 14, 14) -> pool (N, 32, 7, 7)
    -> conv3 (N, 64, 7, 7) -> flatten (N, 3136) -> fc1 (N, 64) -> fc2 (N, 10).

    >>> MnistCNN()(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__((1, 16, 32, 64), padding=1, flat=64 * 7 * 7, hidden=64, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (N, 16, 14, 14)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)  # (N, 32, 7, 7)
        h = F.relu(self.bn3(self.conv3(h))).flatten(1)  # (N, 64, 7, 7) -> (N, 3136)
        return self.fc2(F.relu(self.fc1(h)))


@register_model("fashion-cnn")
def _fashion_cnn() -> nn.Module:
    """The MNIST CNN architecture, trained on Fashion-MNIST (a harder task: ~93 % instead of ~99 %)."""
    return MnistCNN()


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (1x1 conv + BN when the shape changes) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (CVPR 2016, section 4.2) for 1-channel 28x28 images.

    A 3x3 stem with 16 channels, then 3 stages of 3 basic blocks (16, 32, 64 channels; stages 2
    and 3 halve the resolution with a 1x1 projection shortcut), global average pooling and one
    linear classifier: 0.27M params, 31M MACs per image. Shapes: (N, 1, 28, 28) -> stem
    (N, 16, 28, 28) -> layer1 (N, 16, 28, 28) -> layer2 (N, 32, 14, 14) -> layer3 (N, 64, 7, 7)
    -> pool (N, 64) -> fc (N, 10).

    >>> ResNet20()(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, c_in, stages = (16, 32, 64), 16, []
        for i, c in enumerate(widths):
            blocks = [_BasicBlock(c_in if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1) for j in range(3)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(h.mean(dim=(2, 3)))


register_model("mnist-resnet20")(ResNet20)
register_model("fashion-resnet20")(ResNet20)
