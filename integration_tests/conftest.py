from __future__ import annotations

import logging

import pytest
import torch

from classaware_plugin.core import ClassDependentLoss, set_quiet, train
from classaware_plugin.data import load_digits
from classaware_plugin.models import build_model

set_quiet(True)


@pytest.fixture(autouse=True)
def _seed(caplog):
    torch.manual_seed(0)
    caplog.set_level(logging.WARNING)
    yield


@pytest.fixture(scope="session")
def digits():
    """Digits at 16x16, class 3 important and rare (20% kept in train)."""
    return load_digits(important=[3], keep_fraction=0.2, seed=0, image_size=16, channels=1)


@pytest.fixture(scope="session")
def dense_digits_model(digits):
    """A CIFAR-style ResNet-8 trained with the class-dependent loss (about 10 s)."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet", digits.num_classes, digits.input_shape, depth=8, width=16)
    train_dl, _, _ = digits.loaders(64, seed=0)
    train(model, train_dl, ClassDependentLoss([3], digits.train_counts), epochs=15, lr=3e-3, progress=False)
    return model.eval()
