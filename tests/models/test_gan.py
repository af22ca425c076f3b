"""The tiny CycleGAN: the style is deterministic, training runs and lowers the cycle error, weights round-trip."""

from __future__ import annotations

import copy

import torch

from brainsurgeon.models.gan import (
    PatchDiscriminator,
    ResnetGenerator,
    finetune_pair_,
    pretrained_cyclegan,
    save_cyclegan,
    style,
    train_cyclegan,
    translation_scores,
)
from brainsurgeon.prune.costs import measure


def _digits(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):  # vertical and horizontal strokes at random places: digit-like, known content
        r, c = (int(v) for v in torch.randint(6, 22, (2,), generator=g))
        x[i, 0, 4:24, c] = 1.0
        x[i, 0, r, 4:24] = float(i % 2)
    return x


def test_style_is_deterministic_thickened_and_inverted():
    a = _digits(4)
    b = style(a)
    assert torch.equal(b, style(a)) and b.min() >= 0 and b.max() <= 1
    assert (b < 0.5).sum() > (a > 0.5).sum()  # thicker strokes, now dark on light


def test_generator_and_discriminator_shapes_and_cost():
    G, D = ResnetGenerator(), PatchDiscriminator()
    x = torch.zeros(2, 1, 28, 28)
    assert G(x).shape == x.shape and D(x).shape == (2, 1, 7, 7)
    assert sum(p.numel() for p in G.parameters()) < 60_000
    assert 10e6 < measure(G.eval(), x[:1]).total_macs < 16e6


def test_training_runs_and_finetuning_distils(tmp_path):
    a = _digits(64)
    G, F_, D_A, D_B = train_cyclegan(a[:32], style(a[32:]), steps=6, batch=8)
    s = translation_scores(G, F_, a[:16])
    assert set(s) == {"l1_G", "l1_F"} and all(0 <= v <= 2 for v in s.values())
    path = tmp_path / "gan.safetensors"
    save_cyclegan(G, F_, D_A, D_B, path)
    G2, F2, _, _ = pretrained_cyclegan(path)
    x = a[:4] * 2 - 1
    with torch.no_grad():
        assert torch.equal(G2(x), G(x)) and torch.equal(F2(x), F_(x))
    student_g, student_f = ResnetGenerator(ngf=8), ResnetGenerator(ngf=8)
    with torch.no_grad():
        gap0 = float((student_g.eval()(x) - G(x)).abs().mean())
    finetune_pair_(student_g, student_f, G, F_, a[:32], style(a[32:]), steps=30, batch=8, lam_cycle=0.0)
    with torch.no_grad():
        assert float((student_g(x) - G(x)).abs().mean()) < gap0  # the student moved toward the teacher


def test_shipped_weights_translate_mnist():
    from brainsurgeon.models.gan import _weights_path

    if not _weights_path().is_file():
        import pytest

        pytest.skip("no shipped CycleGAN weights in this checkout")
    from brainsurgeon.models import load_mnist_splits

    G, F_, _, _ = pretrained_cyclegan()
    a = load_mnist_splits()[2].tensors[0][:256]
    s = translation_scores(G, F_, a)
    assert s["l1_G"] < 0.05 and s["l1_F"] < 0.05  # 900 training steps: 0.018 / 0.019 on 2,000 test images


def test_finetune_cache_trains_exactly_as_without_it():
    """Students fine-tuned through one shared cache (a shorter call first, then longer ones) end bit-identical to
    students fine-tuned without it; other teachers empty the cache."""
    torch.manual_seed(0)
    a = _digits(48)
    b = style(a[24:])
    G, F_ = ResnetGenerator(ngf=4, blocks=1).eval(), ResnetGenerator(ngf=4, blocks=1).eval()
    init = ResnetGenerator(ngf=2, blocks=1), ResnetGenerator(ngf=2, blocks=1)

    def tuned(steps, cache=None, teachers=(G, F_)):
        g, f = (copy.deepcopy(m) for m in init)
        finetune_pair_(g, f, *teachers, a[:24], b, steps=steps, batch=8, cache=cache)
        return [p.detach().clone() for p in (*g.parameters(), *f.parameters())]

    cache: dict = {}
    short = tuned(3, cache)
    assert len(cache["steps"]) == 3
    ref = tuned(7)
    for _ in range(2):  # the cache extended from 3 to 7 steps, then read back
        assert all(torch.equal(x, y) for x, y in zip(tuned(7, cache), ref, strict=True))
    assert len(cache["steps"]) == 7
    assert all(torch.equal(x, y) for x, y in zip(short, tuned(3), strict=True))
    other = ResnetGenerator(ngf=4, blocks=1).eval(), F_
    tuned(2, cache, other)
    assert len(cache["steps"]) == 2 and cache["source"][0] is other[0]
