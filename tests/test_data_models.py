from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from classaware_plugin.core import ClassAwareError
from classaware_plugin.data import labels_of, load_breast_cancer, load_dataset, load_digits, rare_indices
from classaware_plugin.models import MODELS, build_model

from .conftest import require_fashion_or_skip


def test_digits_bundle_is_stratified_and_rare_in_train_only():
    b = load_digits(important=[3], keep_fraction=0.2, seed=1, image_size=32, channels=3)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    counts = b.train_counts
    assert counts[3] == pytest.approx(0.2 * np.median(counts), abs=3)
    val = np.bincount(labels_of(b.val), minlength=10)
    assert val.min() >= 30 and val[3] >= 30
    assert len(b.train) + len(b.val) + len(b.test) < 1797  # rare class thinned
    again = load_digits(important=[3], keep_fraction=0.2, seed=1, image_size=32, channels=3)
    assert torch.equal(again.train.tensors[0], b.train.tensors[0])


def test_rare_indices_keeps_at_least_one_and_is_seeded():
    y = np.array([0] * 10 + [1] * 10)
    idx = rare_indices(y, [1], 0.01, seed=0)
    assert (y[idx] == 1).sum() == 1 and (y[idx] == 0).sum() == 10
    assert np.array_equal(idx, rare_indices(y, [1], 0.01, seed=0))
    with pytest.raises(ClassAwareError, match="keep_fraction"):
        rare_indices(y, [1], 0.0)


def test_breast_cancer_and_class_names():
    b = load_breast_cancer()
    assert b.class_names == ["malignant", "benign"] and b.input_shape == (30,)
    assert b.class_index("malignant") == 0
    with pytest.raises(ClassAwareError, match="malignant"):
        b.class_index("melanoma")


def test_unknown_dataset_lists_choices():
    with pytest.raises(ClassAwareError, match="'breast_cancer', 'digits', 'fashion_mnist', 'image_folder'"):
        load_dataset("cifar10")


def test_image_folder(tmp_path: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("ok", "crack"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    b = load_dataset("image_folder", root=str(tmp_path), image_size=16)
    assert b.class_names == ["crack", "ok"] and b.input_shape == (3, 16, 16)
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and len(b.train) + len(b.val) + len(b.test) == 20
    # Decoded once into memory (the default when it fits) or from disk every time: the same tensors.
    disk = load_dataset("image_folder", root=str(tmp_path), image_size=16, cache=False)
    assert type(b.train.dataset).__name__ == "_DecodedImages" and type(disk.train.dataset).__name__ == "ImageFolder"
    for split in ("train", "val", "test"):
        a, d = getattr(b, split), getattr(disk, split)
        assert all(torch.equal(a[i][0], d[i][0]) and a[i][1] == d[i][1] for i in range(len(a)))


@pytest.mark.fashion
def test_fashion_mnist_from_the_debian_package():
    require_fashion_or_skip()
    b = load_dataset("fashion_mnist", important=[6], keep_fraction=0.1, download=False)
    assert len(b.test) == 10000 and b.class_names[6] == "Shirt"
    assert b.train_counts[6] == pytest.approx(0.1 * b.train_counts[0], rel=0.05)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_with_the_right_width(name):
    shape = (30,) if name == "mlp" else (3, 16, 16)
    model = build_model(name, 5, shape)
    assert model(torch.zeros(2, *shape)).shape == (2, 5)


def test_model_errors_name_the_problem():
    with pytest.raises(ClassAwareError, match="'cifar_resnet'"):
        build_model("vgg", 10, (3, 8, 8))
    with pytest.raises(ClassAwareError, match=r"\(batch, 7\)"):
        build_model("tests.test_data_models:_wrong_width", 7, (3, 8, 8))


def _wrong_width(num_classes: int):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, num_classes + 1))


def test_core_imports_neither_framework():
    code = (
        "import sys, classaware_plugin, classaware_plugin.data, classaware_plugin.models;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('nni','torch_pruning')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
