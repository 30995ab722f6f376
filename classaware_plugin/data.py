"""Data sets that work offline, stratified splits, and rare important classes.

Built-in names: ``digits`` (scikit-learn, the embedded default), ``breast_cancer`` (scikit-learn,
malignant = class 0), ``fashion_mnist`` (local IDX files of the Debian package
``dataset-fashion-mnist``, a given folder, else torchvision's download), and ``image_folder``
(any torchvision ImageFolder). The important classes are made rare in the *training* split only
(a seeded fraction of their samples kept); validation and test keep their natural distribution, so
FN is measured on enough positives.
"""
from __future__ import annotations

import dataclasses
import gzip
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .core.validation import (
    ClassAwareError, Interval, Options, check_choice, check_important_classes, check_int_list, check_number, check_params,
)
from .core.progress import progress_bar

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class DataBundle:
    """Train / validation / test datasets of ``(input, label)`` and what describes them."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]
    train_counts: list[int] = field(default_factory=list)

    def loaders(self, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Shuffled (seeded) train loader, ordered validation and test loaders."""
        check_number("batch_size", batch_size, low=1, integer=True)
        g = torch.Generator().manual_seed(seed)
        return (
            DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(self.val, batch_size=max(batch_size, 256)),
            DataLoader(self.test, batch_size=max(batch_size, 256)),
        )

    def class_index(self, cls: int | str) -> int:
        """An important class given by index or by name."""
        if isinstance(cls, str):
            if cls not in self.class_names:
                raise ClassAwareError(f"Unknown class name {cls!r}; the classes of {self.name} are {self.class_names}.")
            return self.class_names.index(cls)
        return check_important_classes([cls], self.num_classes)[0]


def _labels(ds: Dataset) -> np.ndarray:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    if isinstance(ds, Subset):
        return _labels(ds.dataset)[np.asarray(ds.indices)]
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    try:
        return np.asarray([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]
    except (TypeError, IndexError, ValueError, KeyError) as e:
        raise ClassAwareError(f"Cannot read the labels of a {type(ds).__name__}: give it a 'targets' attribute, or "
                              f"items (input, label) with an integer label ({type(e).__name__}: {e}).") from None


def labels_of(ds: Dataset) -> np.ndarray:
    """The label of every sample: without loading the inputs for a TensorDataset, a Subset of one or a data set with a
    ``targets`` attribute (torchvision's), else by reading every item."""
    return _labels(ds)


def rare_indices(y: np.ndarray, classes: Sequence[int], keep_fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of ``y`` that keep every sample of other classes and a seeded ``keep_fraction`` of ``classes``.

    At least one sample of each listed class is kept.
    """
    check_number("keep_fraction", keep_fraction, low=0.0, high=1.0, low_open=True)
    rng = np.random.default_rng(seed)
    keep = np.ones(len(y), dtype=bool)
    for c in classes:
        idx = np.flatnonzero(y == c)
        n_keep = max(1, int(round(keep_fraction * len(idx))))
        drop = rng.permutation(idx)[n_keep:]
        keep[drop] = False
    return np.flatnonzero(keep)


def stratified_split(y: np.ndarray, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Split indices of ``y`` into parts of the given fractions (summing to 1), stratified by label."""
    idx = np.arange(len(y))
    parts = []
    remaining = 1.0
    for frac in fractions[:-1]:
        take, idx = train_test_split(idx, train_size=frac / remaining, stratify=y[idx], random_state=seed)
        parts.append(np.sort(take))
        remaining -= frac
    parts.append(np.sort(idx))
    return parts


def _tensor_ds(x: np.ndarray | torch.Tensor, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


def _standardise(x_train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    return [(t - mean) / std for t in (x_train, *others)]


def _bundle_from_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    important: Sequence[int],
    keep_fraction: float,
    seed: int,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    per_feature: bool = False,
) -> DataBundle:
    if x_test is None:
        tr, va, te = stratified_split(y, fractions, seed)
        x_test, y_test = x[te], y[te]
    else:
        tr, va = stratified_split(y, (fractions[0] / (fractions[0] + fractions[1]), 1.0), seed)
    assert y_test is not None
    if keep_fraction < 1.0:
        tr = tr[rare_indices(y[tr], important, keep_fraction, seed)]
    xt, xv, xs = (torch.as_tensor(a, dtype=torch.float32) for a in (x[tr], x[va], x_test))
    if per_feature:
        mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
        xt, xv, xs = ((t - mean) / std for t in (xt, xv, xs))
    else:
        xt, xv, xs = _standardise(xt, xv, xs)
    k = len(class_names)
    return DataBundle(
        name=name,
        train=_tensor_ds(xt, y[tr]),
        val=_tensor_ds(xv, y[va]),
        test=_tensor_ds(xs, y_test),
        num_classes=k,
        class_names=class_names,
        input_shape=tuple(xt.shape[1:]),
        train_counts=np.bincount(y[tr], minlength=k).tolist(),
    )


def _resize(x: np.ndarray, image_size: int | None, channels: int) -> np.ndarray:
    t = torch.as_tensor(x, dtype=torch.float32)
    if image_size is not None and image_size != t.shape[-1]:
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if channels != t.shape[1]:
        t = t.repeat(1, channels, 1, 1)
    return t.numpy()


def load_digits(
    important: Sequence[int] = (), keep_fraction: float = 1.0, seed: int = 0,
    image_size: int | None = None, channels: int = 1,
) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (optionally resized, e.g. 32x32 with 3 channels for torchvision models)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = _resize(d.images[:, None] / 16.0, image_size, channels)
    return _bundle_from_arrays("digits", x, d.target, [str(i) for i in range(10)], important, keep_fraction, seed)


def load_breast_cancer(important: Sequence[int] = (0,), keep_fraction: float = 1.0, seed: int = 0) -> DataBundle:
    """scikit-learn's breast cancer table (30 features); class 0 = malignant, 1 = benign."""
    from sklearn.datasets import load_breast_cancer as sk_bc

    d = sk_bc()
    return _bundle_from_arrays(
        "breast_cancer", d.data, d.target, list(d.target_names), important, keep_fraction, seed, per_feature=True
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for cand in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
        if cand.exists():
            return cand
    return None


def fashion_mnist_arrays(root: str | os.PathLike[str] | None = None, download: bool = True) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) as uint8 arrays from local IDX files, else torchvision's download."""
    root_path = Path(root) if root is not None else FASHION_MNIST_DIR
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    found = [_find(root_path, s) for s in stems]
    if all(found):
        return tuple(_read_idx(p) for p in found)  # type: ignore[arg-type]
    if not download or root is not None:  # a folder the user named is never replaced by a download
        missing = [s for s, f in zip(stems, found) if f is None]
        raise ClassAwareError(
            f"Fashion-MNIST files not found under {str(root_path)!r} (missing: {', '.join(missing)}[.gz]). Install "
            "them with 'apt-get install dataset-fashion-mnist', pass the folder that holds the IDX files, or leave "
            "the path unset to download them."
        )
    from torchvision.datasets import FashionMNIST

    log.info("Fashion-MNIST not found under %s; downloading with torchvision", root_path)
    cache = Path(os.environ.get("CLASSAWARE_DATA", Path.home() / ".cache" / "classaware"))
    tr = FashionMNIST(cache, train=True, download=True)
    te = FashionMNIST(cache, train=False, download=True)
    return tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy()


def load_fashion_mnist(
    important: Sequence[int] = (6,), keep_fraction: float = 1.0, seed: int = 0, root: str | None = None,
    val_fraction: float = 0.1, train_limit: int | None = None, download: bool = True,
) -> DataBundle:
    """Fashion-MNIST: validation split (stratified) from train, the official 10,000-image test split.

    ``train_limit`` keeps a stratified subset of the training images (for quick runs).
    """
    x_tr, y_tr, x_te, y_te = fashion_mnist_arrays(root, download)
    if train_limit is not None and train_limit < len(y_tr):
        sub, _ = train_test_split(np.arange(len(y_tr)), train_size=train_limit, stratify=y_tr, random_state=seed)
        x_tr, y_tr = x_tr[np.sort(sub)], y_tr[np.sort(sub)]
    return _bundle_from_arrays(
        "fashion_mnist", x_tr[:, None] / 255.0, y_tr.astype(np.int64), list(FASHION_MNIST_CLASSES), important,
        keep_fraction, seed, fractions=(1 - val_fraction, val_fraction), x_test=x_te[:, None] / 255.0,
        y_test=y_te.astype(np.int64),
    )


IMAGE_SIZE = Interval(4, 512, integer=True)
"""The side in pixels images may be resized to (``image_size``)."""

CACHE_LIMIT_BYTES = 2 * 1024**3
"""Decoded images are kept in memory (as uint8) when they take at most this much; above it they are decoded from
disk at every epoch."""


class _DecodedImages(Dataset):
    """Images decoded once into a uint8 tensor; items are float tensors in [0, 1] as ``ToTensor`` gives them."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int]) -> None:
        self.images = images
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255.0), self.targets[i]


def load_image_folder(
    root: str, important: Sequence[int] = (), keep_fraction: float = 1.0, seed: int = 0, image_size: int = 64,
    cache: bool | None = None,
) -> DataBundle:
    """Any torchvision ImageFolder (one sub-folder per class), split 60/20/20 stratified.

    ``cache``: decode every image once and keep them in memory (``None``: when they take at most
    :data:`CACHE_LIMIT_BYTES`), instead of decoding PNG/JPEG files at every epoch.
    """
    from torchvision import datasets, transforms

    if not Path(root).is_dir():
        raise ClassAwareError(f"The image folder {root!r} does not exist.")
    resize = transforms.Resize((image_size, image_size))
    folder = datasets.ImageFolder(root)  # its loader converts every image to RGB: 3 channels
    classes, targets = list(folder.classes), list(folder.targets)
    need = len(targets) * 3 * image_size * image_size
    if cache is None:
        cache = need <= CACHE_LIMIT_BYTES
        if not cache:
            log.info("%d images at %d px need %.1f GiB decoded (limit %.1f GiB): decoding from disk at every epoch "
                     "(cache=True forces the cache)", len(targets), image_size, need / 1024**3, CACHE_LIMIT_BYTES / 1024**3)
    ds: Dataset
    if cache:
        folder.transform = transforms.Compose([resize, transforms.PILToTensor()])
        images = torch.empty(len(targets), 3, image_size, image_size, dtype=torch.uint8)
        for i in progress_bar(range(len(targets)), desc="decoding images", total=len(targets)):
            images[i] = folder[i][0]
        ds = _DecodedImages(images, targets)
    else:
        folder.transform = transforms.Compose([resize, transforms.ToTensor()])
        ds = folder
    y = np.asarray(targets)
    tr, va, te = stratified_split(y, (0.6, 0.2, 0.2), seed)
    if keep_fraction < 1.0:
        tr = tr[rare_indices(y[tr], important, keep_fraction, seed)]
    k = len(classes)
    return DataBundle(
        name="image_folder", train=Subset(ds, tr.tolist()), val=Subset(ds, va.tolist()), test=Subset(ds, te.tolist()),
        num_classes=k, class_names=classes, input_shape=(3, image_size, image_size),
        train_counts=np.bincount(y[tr], minlength=k).tolist(),
    )


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: its loader and the ``data`` configuration keys it takes (key -> loader keyword)."""

    loader: Callable[..., DataBundle]
    config: Mapping[str, str]
    description: str


DATASETS: dict[str, DatasetEntry] = {}
"""The data sets ``load_dataset`` and the CLI's ``data.name`` know, by name (:func:`register_dataset`)."""


def register_dataset(name: str, loader: Callable[..., DataBundle], config: Mapping[str, str] | None = None,
                     description: str = "") -> None:
    """Make ``loader`` (``loader(important=, keep_fraction=, seed=, **kw) -> DataBundle``) available as ``name`` to
    :func:`load_dataset` and as ``data.name`` to the CLI. ``config`` maps the ``data`` configuration keys it reads to
    its keywords (e.g. ``{"path": "root"}``). A name registered twice is replaced, with a warning (as timm does)."""
    if name in DATASETS:
        log.warning("data set %r registered again: the new loader replaces %r", name, DATASETS[name].loader)
    DATASETS[name] = DatasetEntry(loader, dict(config or {}), description)


register_dataset("digits", load_digits, {"image_size": "image_size", "channels": "channels"},
                 "scikit-learn's 1,797 8x8 handwritten digits (embedded; image_size resizes them)")
register_dataset("breast_cancer", load_breast_cancer, {},
                 "scikit-learn's 569 tumours, 30 features; class 0 = malignant (embedded)")
register_dataset("fashion_mnist", load_fashion_mnist, {"path": "root", "train_limit": "train_limit"},
                 "Fashion-MNIST from path (IDX files), the Debian package's folder, else downloaded")
register_dataset("image_folder", load_image_folder, {"path": "root", "image_size": "image_size"},
                 "any torchvision ImageFolder at path (one sub-folder per class), split 60/20/20")


def load_dataset(name: str, **kwargs: Any) -> DataBundle:
    """Load a built-in data set by name (see :data:`DATASETS`); the important classes must exist in it."""
    check_choice("dataset", name, sorted(DATASETS))
    accepted = inspect.signature(DATASETS[name].loader).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ClassAwareError(f"load_dataset({name!r}) got unknown keyword(s) {unknown}; {name} accepts "
                              f"{sorted(accepted)}.")
    common = {"keep_fraction": Interval(0.0, 1.0, low_open=True), "seed": Interval(0, integer=True),
              "image_size": IMAGE_SIZE if name == "image_folder" else dataclasses.replace(IMAGE_SIZE, nullable=True),
              "channels": Options((1, 3)), "train_limit": Interval(1, integer=True, nullable=True),
              "val_fraction": Interval(0.0, 1.0, low_open=True, high_open=True)}
    check_params(common, kwargs)
    if "important" in kwargs and kwargs["important"] is None:  # None means the data set's own default
        kwargs = {k: v for k, v in kwargs.items() if k != "important"}
    if kwargs.get("important"):
        check_int_list("important", kwargs["important"], low=0, high=None)
    bundle = DATASETS[name].loader(**kwargs)
    if kwargs.get("important"):
        check_int_list("important", kwargs["important"], low=0, high=bundle.num_classes)
    return bundle
