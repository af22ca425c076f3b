"""Built-in example models and real, offline data for the demo, the CLI and the tests.

    >>> from brainsurgeon.models import pretrained, calibration_loader, evaluate
    >>> model, train_ds, test_ds = pretrained("digits-cnn")
    >>> calib = calibration_loader(train_ds, n=256)
    >>> evaluate(model, test_ds)
    0.99...
"""

from .cnn import DigitsCNN, MnistCNN, ResNet20, build_model, register_model, registered_models
from .data import MissingDataError, calibration_loader, load_digits_splits, load_fashion_mnist_splits, load_mnist_splits
from .train import evaluate, train
from .zoo import default_cache_dir, load_data, pretrained, save_atomic

__all__ = [
    "DigitsCNN", "MissingDataError", "MnistCNN", "build_model", "calibration_loader",
    "ResNet20", "default_cache_dir", "evaluate", "load_data", "load_digits_splits",
    "load_fashion_mnist_splits", "load_mnist_splits",
    "pretrained", "register_model", "registered_models", "save_atomic", "train",
]
