"""A tiny unpaired image-translation CycleGAN with a known ground truth: MNIST (A) <-> styled MNIST (B).

B is a deterministic style of A: digits thickened (3x3 max-pool dilation) and inverted, ``B = 1 -
dilate(A)``. The two domains are trained UNPAIRED (A images from one half of the training set, B images
styled from the other half; Zhu et al., "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017: LSGAN losses + lambda * cycle L1), but since the style is known the
translation is measured exactly: L1 of ``G(a)`` to ``style(a)``, of ``F(style(a))`` to ``a``, and a frozen
MNIST classifier's accuracy on ``F(style(a))`` (B -> A) and on ``1 - G(a)`` (A -> B, un-inverted).

Generators are ResNet-style (Johnson et al. 2016, as in CycleGAN): 7x7 conv, a stride-2 conv, residual
blocks, a transposed conv, 7x7 conv + tanh, with BatchNorm (which the dependency graph prunes through)::

The shipped weights (``models/weights/cyclegan-mnist-v1.safetensors``, 900 steps of 32, 204 CPU s; retrain
with ``python bench/gan_coevolve.py --train 900``) reach, on 2,000 MNIST test images: L1 0.018 of G(a) to
style(a), 0.019 of F(style(a)) to a, MNIST-CNN accuracy 98.35 % on F(style(a)) and 96.6 % on 1 - G(a).

    >>> G, F_, D_A, D_B = pretrained_cyclegan()          # package data (safetensors), else trains (minutes)
    >>> scores = translation_scores(G, F_, test_a, classifier)
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._log import get_logger
from .._modes import eval_mode

log = get_logger(__name__)

WEIGHTS = "cyclegan-mnist-v1.safetensors"  # in brainsurgeon/models/weights/


def style(a: torch.Tensor) -> torch.Tensor:
    """Domain B from domain A images in [0, 1] (N, 1, H, W): thickened (3x3 dilation) and inverted."""
    return 1.0 - F.max_pool2d(a, 3, stride=1, padding=1)


def to_gan(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1  # [0, 1] -> [-1, 1]


def from_gan(y: torch.Tensor) -> torch.Tensor:
    return (y + 1) / 2  # [-1, 1] -> [0, 1]


class ResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class ResnetGenerator(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> same shape: c7s1-ngf, d(2 ngf), `blocks` residual blocks, u(ngf), c7s1-1, tanh.

    ngf=16, blocks=2: 48k parameters, 10.3M MACs per image.

    >>> ResnetGenerator()(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 1, 28, 28])
    """

    def __init__(self, ngf: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, ngf, 7, padding=3, bias=False), nn.BatchNorm2d(ngf)
        self.down, self.bn1 = nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * ngf)
        self.blocks = nn.Sequential(*[ResBlock(2 * ngf) for _ in range(blocks)])
        self.up = nn.ConvTranspose2d(2 * ngf, ngf, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ngf)
        self.head = nn.Conv2d(ngf, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))  # (N, ngf, 28, 28)
        h = self.blocks(F.relu(self.bn1(self.down(h))))  # (N, 2 ngf, 14, 14)
        h = F.relu(self.bn2(self.up(h)))  # (N, ngf, 28, 28)
        return torch.tanh(self.head(h))  # (N, 1, 28, 28)


class PatchDiscriminator(nn.Module):
    """A 70x70-PatchGAN in miniature: (N, 1, 28, 28) -> (N, 1, 7, 7) real/fake scores (LSGAN)."""

    def __init__(self, ndf: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, ndf, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ndf), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ndf, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batches(x: torch.Tensor, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            yield x[perm[i:i + batch]]


def train_cyclegan(a_images: torch.Tensor, b_images: torch.Tensor, steps: int = 1500, batch: int = 32,
                   lr: float = 1e-3, lam_cycle: float = 10.0, seed: int = 0
                   ) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """CycleGAN training on unpaired A and B images in [0, 1] (N, 1, 28, 28); returns (G, F, D_A, D_B) in eval mode.

    G: A -> B, F: B -> A; LSGAN adversarial losses, cycle L1 weighted by `lam_cycle`, Adam(beta1=0.5).

    >>> G, F_, D_A, D_B = train_cyclegan(a, style(b), steps=200)
    """
    torch.manual_seed(seed)
    G, F_, D_A, D_B = ResnetGenerator(), ResnetGenerator(), PatchDiscriminator(), PatchDiscriminator()
    opt_g = torch.optim.Adam([*G.parameters(), *F_.parameters()], lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*D_A.parameters(), *D_B.parameters()], lr=lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    it_a, it_b = _batches(to_gan(a_images), batch, gen), _batches(to_gan(b_images), batch, gen)
    for m in (G, F_, D_A, D_B):
        m.train()
    for step in range(steps):
        a, b = next(it_a), next(it_b)
        fake_b, fake_a = G(a), F_(b)
        adv = ((D_B(fake_b) - 1) ** 2).mean() + ((D_A(fake_a) - 1) ** 2).mean()
        cyc = (F_(fake_b) - a).abs().mean() + (G(fake_a) - b).abs().mean()
        loss_g = adv + lam_cycle * cyc
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d = sum(((D(real) - 1) ** 2).mean() + (D(fake.detach()) ** 2).mean()
                for D, real, fake in ((D_B, b, fake_b), (D_A, a, fake_a)))
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()
        if step % 250 == 0:
            log.info("cyclegan step %d: adv %.3f cycle %.3f disc %.3f", step, adv.item(), cyc.item(), d.item())
    return G.eval(), F_.eval(), D_A.eval(), D_B.eval()


@torch.no_grad()
def translation_scores(G: nn.Module, F_: nn.Module, a: torch.Tensor, classifier: nn.Module | None = None,
                       labels: torch.Tensor | None = None) -> dict[str, float]:
    """Exact fidelity on held-out A images a in [0, 1]: L1 of G(a) to style(a), of F(style(a)) to a, and
    (with a classifier and labels) its accuracy on F(style(a)) and on 1 - G(a)."""
    with eval_mode(G, F_, *([classifier] if classifier is not None else [])):
        b = style(a)
        gb, fa = from_gan(G(to_gan(a))), from_gan(F_(to_gan(b)))
        out = {"l1_G": float((gb - b).abs().mean()), "l1_F": float((fa - a).abs().mean())}
        if classifier is not None and labels is not None:
            out["acc_F"] = float((classifier(fa).argmax(1) == labels).float().mean())
            out["acc_G"] = float((classifier(1 - gb).argmax(1) == labels).float().mean())
        return out


def finetune_pair_(G: nn.Module, F_: nn.Module, G0: nn.Module, F0: nn.Module, a_images: torch.Tensor,
                   b_images: torch.Tensor, steps: int, lr: float = 1e-3, lam_cycle: float = 1.0, batch: int = 32,
                   seed: int = 0, cache: dict[str, Any] | None = None) -> None:
    """Distil the dense pair into the compressed pair: L1 to the dense generators' outputs on unpaired A and B
    batches plus `lam_cycle` x cycle L1 through the partner (Shu et al. 2019, sec. 3.3), Adam, in place.

    (The classification ``distill`` loop matches logits with a softened KL, which does not apply to images.)

    cache: a dict shared by calls that fine-tune several students from the same teachers, images, batch size
    and seed (the arms of a benchmark): the batches and the dense outputs of every step are computed once and
    read back by the later calls, which then train exactly as without it (the teachers must not change in
    between). A call with other teachers, images, batch or seed empties it first.

    >>> cache = {}
    >>> for G, F_ in students:
    ...     finetune_pair_(G, F_, G0, F0, a, b, steps=200, cache=cache)   # the teachers run once per step
    """
    if steps <= 0:
        return
    source = (G0, F0, a_images, b_images, batch, seed)
    if cache is None:
        cache = {}
    elif len(old := cache.get("source", ())) != len(source) or any(
            x is not y for x, y in zip(old, source, strict=True)):
        cache.clear()
    cache["source"] = source
    if "stream" not in cache:
        gen = torch.Generator().manual_seed(seed)
        cache["stream"] = (_batches(to_gan(a_images), batch, gen), _batches(to_gan(b_images), batch, gen))
        cache["steps"] = []
    (it_a, it_b), steps_seen = cache["stream"], cache["steps"]
    opt = torch.optim.Adam([*G.parameters(), *F_.parameters()], lr=lr, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    G0.eval()
    F0.eval()
    G.train()
    F_.train()
    try:
        for step in range(steps):
            if step == len(steps_seen):  # a step no earlier call ran: draw its batches, run the teachers once
                a, b = next(it_a), next(it_b)
                with torch.no_grad():
                    steps_seen.append((a, b, G0(a), F0(b)))
            a, b, ta, tb = steps_seen[step]
            ga, fb = G(a), F_(b)
            loss = (ga - ta).abs().mean() + (fb - tb).abs().mean()
            loss = loss + lam_cycle * ((F_(ga) - a).abs().mean() + (G(fb) - b).abs().mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        G.eval()
        F_.eval()


def mnist_domains(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A train images, B train images, A test images, test labels) in [0, 1]: A and B from disjoint halves of
    the MNIST training set (unpaired); n: at most this many per domain."""
    from .data import load_mnist_splits

    train, _val, test = load_mnist_splits()
    x = train.tensors[0]
    half = len(x) // 2
    a, b = x[:half], style(x[half:])
    if n is not None:
        a, b = a[:n], b[:n]
    return a, b, test.tensors[0], test.tensors[1]


def _weights_path() -> Path:
    return Path(str(importlib.resources.files("brainsurgeon.models") / "weights" / WEIGHTS))


def save_cyclegan(G: nn.Module, F_: nn.Module, D_A: nn.Module, D_B: nn.Module, path: str | Path) -> None:
    """The four networks' state_dicts in one safetensors file (keys prefixed G., F., D_A., D_B.)."""
    from safetensors.torch import save_file

    tensors = {f"{p}.{k}": v.detach().contiguous() for p, m in (("G", G), ("F", F_), ("D_A", D_A), ("D_B", D_B))
               for k, v in m.state_dict().items()}
    save_file(tensors, str(path))


def pretrained_cyclegan(path: str | Path | None = None, **train_kw: Any
                        ) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(G, F, D_A, D_B) from the package's safetensors (no pickle), or trained with ``train_cyclegan`` if absent.

    >>> G, F_, D_A, D_B = pretrained_cyclegan()
    """
    from safetensors.torch import load_file

    p = Path(path) if path is not None else _weights_path()
    nets = (ResnetGenerator(), ResnetGenerator(), PatchDiscriminator(), PatchDiscriminator())
    if p.is_file():
        flat = load_file(str(p))
        for prefix, m in zip(("G", "F", "D_A", "D_B"), nets, strict=True):
            m.load_state_dict({k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".")})
            m.eval()
        return nets
    log.info("no trained CycleGAN at %s; training one (a few CPU minutes)", p)
    a, b, _, _ = mnist_domains()
    return train_cyclegan(a, b, **train_kw)
