"""The image data sets read through torchvision's own dataset classes.

Files live under a *data root* (``data_root``, else ``$GCONV_DATA_ROOT``, else
``~/.cache/global-convergence/data``) in exactly the layout torchvision's classes use and
download. Everything is loaded into memory as float32 NCHW tensors: pixels scaled to [0, 1], then
normalised per channel with the fixed constants of :data:`NORMALIZATION` (the usual published
statistics of each training set). Semeion keeps its [0, 1] binary pixels (mean 0, std 1), like its
offline stand-in ``digits``, so the two are interchangeable.

``check_integrity=False`` loads through subclasses whose md5 checksums are ``None``: torchvision's
``check_integrity`` then only checks that each file exists, and all its parsing code runs
unchanged. MNIST and KMNIST never compare checksums of the raw files, so they need no subclass.
"""
from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserInputError
from .core import Dataset, choose_subset

DATA_ROOT_ENV = "GCONV_DATA_ROOT"
DEFAULT_DATA_ROOT = "~/.cache/global-convergence/data"

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "semeion": ((0.0,), (1.0,)),
    "mnist": ((0.1307,), (0.3081,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
"""Per-channel (mean, std) applied after scaling pixels to [0, 1]."""

SEMEION_TRAIN_FRACTION = 1000 / 1593
"""Semeion has no official split: 1000 of its 1593 images train, the rest test."""
SEMEION_SPLIT_SEED = 0

Arrays = tuple[np.ndarray, np.ndarray]
"""uint8 images (N, C, H, W) and int64 labels (N,)."""


@dataclass(frozen=True)
class VisionSpec:
    """How to read one torchvision data set."""

    num_classes: int
    augment: str
    files: tuple[str, ...]
    """Paths, relative to the data root, of the files torchvision reads."""
    read: Callable[[str, bool, bool], tuple[Arrays, Arrays]]
    """``read(root, download, md5)`` → (train, test) arrays."""


def resolve_data_root(data_root: str | os.PathLike | None) -> str:
    """``data_root``, else ``$GCONV_DATA_ROOT``, else ``~/.cache/global-convergence/data``."""
    root = data_root
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


@functools.cache
def _without_md5(cls: type) -> type:
    """A subclass of torchvision dataset ``cls`` whose checksums are ``None`` (existence only)."""
    attrs: dict[str, object] = {"__doc__": f"{cls.__name__} that only checks its files exist."}
    if hasattr(cls, "train_list"):                      # CIFAR10, CIFAR100
        attrs["train_list"] = [[f, None] for f, _ in cls.train_list]
        attrs["test_list"] = [[f, None] for f, _ in cls.test_list]
        attrs["meta"] = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):                      # SVHN
        attrs["split_list"] = {k: [url, f, None] for k, (url, f, _) in cls.split_list.items()}
    if hasattr(cls, "md5_checksum"):                    # SEMEION
        attrs["md5_checksum"] = None
    return type(cls.__name__ + "NoMD5", (cls,), attrs)


def _dataset_class(name: str, md5: bool) -> type:
    """torchvision's class for ``name``, or its checksum-free subclass when ``md5`` is False."""
    from torchvision import datasets

    cls = {"semeion": datasets.SEMEION, "mnist": datasets.MNIST, "kmnist": datasets.KMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
           "svhn": datasets.SVHN}[name]
    if md5 or name in ("mnist", "kmnist"):
        return cls
    return _without_md5(cls)


def _read_mnist_like(name: str) -> Callable[[str, bool, bool], tuple[Arrays, Arrays]]:
    """Reader for MNIST / KMNIST (idx-ubyte files under ``<root>/<CLASS>/raw``)."""
    def read(root: str, download: bool, md5: bool) -> tuple[Arrays, Arrays]:
        cls = _dataset_class(name, md5)
        out = []
        for train in (True, False):
            ds = cls(root, train=train, download=download)
            out.append((ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)))
        return out[0], out[1]
    return read


def _read_cifar(name: str) -> Callable[[str, bool, bool], tuple[Arrays, Arrays]]:
    """Reader for CIFAR-10 / CIFAR-100 (python pickle batches)."""
    def read(root: str, download: bool, md5: bool) -> tuple[Arrays, Arrays]:
        cls = _dataset_class(name, md5)
        out = []
        for train in (True, False):
            ds = cls(root, train=train, download=download)
            out.append((np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)),
                        np.asarray(ds.targets, dtype=np.int64)))
        return out[0], out[1]
    return read


def _read_svhn(root: str, download: bool, md5: bool) -> tuple[Arrays, Arrays]:
    """SVHN ``train`` and ``test`` splits (never ``extra``); torchvision maps label 10 to 0."""
    cls = _dataset_class("svhn", md5)
    out = []
    for split in ("train", "test"):
        ds = cls(root, split=split, download=download)
        out.append((np.ascontiguousarray(ds.data), np.asarray(ds.labels, np.int64).reshape(-1)))
    return out[0], out[1]


def _read_semeion(root: str, download: bool, md5: bool) -> tuple[Arrays, Arrays]:
    """Semeion, split with a fixed seed: 1000 train / 593 test for the real 1593 images.

    Files of another size are split in the same proportion, ``round(N * 1000 / 1593)`` train.
    """
    ds = _dataset_class("semeion", md5)(root, download=download)
    x, y = ds.data[:, None], np.asarray(ds.labels, dtype=np.int64)
    order = np.random.default_rng(SEMEION_SPLIT_SEED).permutation(len(y))
    n_train = int(round(len(y) * SEMEION_TRAIN_FRACTION))
    train, test = order[:n_train], order[n_train:]
    return (x[train], y[train]), (x[test], y[test])


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

VISION: dict[str, VisionSpec] = {
    "semeion": VisionSpec(10, "crop", ("semeion.data",), _read_semeion),
    "mnist": VisionSpec(10, "crop", tuple(f"MNIST/raw/{f}" for f in _MNIST_FILES),
                        _read_mnist_like("mnist")),
    "kmnist": VisionSpec(10, "crop", tuple(f"KMNIST/raw/{f}" for f in _MNIST_FILES),
                         _read_mnist_like("kmnist")),
    "cifar10": VisionSpec(10, "crop-flip", tuple(
        f"cifar-10-batches-py/{f}" for f in ("data_batch_1", "data_batch_2", "data_batch_3",
                                             "data_batch_4", "data_batch_5", "test_batch",
                                             "batches.meta")), _read_cifar("cifar10")),
    "cifar100": VisionSpec(100, "crop-flip", tuple(
        f"cifar-100-python/{f}" for f in ("train", "test", "meta")), _read_cifar("cifar100")),
    "svhn": VisionSpec(10, "crop", ("train_32x32.mat", "test_32x32.mat"), _read_svhn),
}


def _missing_file(spec: VisionSpec, root: str) -> str | None:
    """The first file of ``spec`` absent under ``root``, or None."""
    for rel in spec.files:
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return path
    return None


_READ_ERRORS = (RuntimeError, OSError, ValueError, TypeError, KeyError, EOFError,
                AssertionError, pickle.UnpicklingError)
"""What torchvision's readers raise on missing, corrupted or unparsable files."""


def _read_files(name: str, root: str, download: bool, md5: bool) -> tuple[Arrays, Arrays]:
    """Run torchvision's reader, turning its errors about the files into one-line messages."""
    spec = VISION[name]
    try:
        return spec.read(root, download, md5)
    except _READ_ERRORS as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        missing = _missing_file(spec, root)
        if download:
            raise UserInputError(f"dataset {name!r} could not be downloaded into data root "
                                 f"{root!r} ({detail})") from err
        if missing is not None:
            raise UserInputError(
                f"dataset {name!r} not found in data root {root!r} (missing {missing}); run "
                "with --download (download=True) on a machine with internet access, or set "
                "--data-root / GCONV_DATA_ROOT") from err
        raise UserInputError(
            f"dataset {name!r} in data root {root!r} could not be read ({detail}); expected "
            "torchvision's files with their original md5 checksums (check_integrity=False skips "
            "only the md5 comparison)") from err


def to_float(images: np.ndarray, name: str) -> torch.Tensor:
    """uint8 NCHW images → float32 in [0, 1], then normalised with :data:`NORMALIZATION`."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                 for v in NORMALIZATION[name])
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std)


def load_vision(name: str, *, n: int | None, seed: int, data_root: str | None,
                download: bool, check_integrity: bool) -> Dataset:
    """Load torchvision data set ``name`` into memory; ``n`` picks a seeded training subset."""
    root = resolve_data_root(data_root)
    spec = VISION[name]
    (x_tr, y_tr), (x_te, y_te) = _read_files(name, root, download, check_integrity)
    notes = [f"{name} from {root}"]
    if name == "semeion":
        notes.append(f"no official split: {len(y_tr)} train / {len(y_te)} test with fixed "
                     f"seed {SEMEION_SPLIT_SEED}")
    pick = choose_subset(len(y_tr), n, seed, name)
    if pick is not None:
        x_tr, y_tr = x_tr[pick], y_tr[pick]
    return Dataset(name, to_float(x_tr, name), torch.from_numpy(np.ascontiguousarray(y_tr)),
                   to_float(x_te, name), torch.from_numpy(np.ascontiguousarray(y_te)),
                   spec.num_classes, note="; ".join(notes), augment=spec.augment)
