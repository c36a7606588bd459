"""``load_dataset``: one entry point for every data set of the package by name or ``.npz`` path."""
from __future__ import annotations

import numpy as np

from ..errors import UserInputError
from .core import Dataset, check_n
from .generated import digits, generate
from .user_npz import is_npz_path, load_npz
from .validation import check_loss, validate_arrays
from .vision import VISION, load_vision

DATASET_NAMES = ("two-moons", "sine", "random", "digits", "semeion", "mnist", "kmnist",
                 "cifar10", "cifar100", "svhn")
"""Built-in data sets; any path ending in ``.npz`` names the user's own file as well."""

_GENERATED = ("two-moons", "sine", "random")


def load_dataset(name: str, *, n: int | None = None, seed: int = 0, data_root: str | None = None,
                 download: bool = False, loss: str = "ce", noise: float | None = None,
                 check_integrity: bool = True) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASET_NAMES`, or a ``.npz`` path) into memory.

    ``n``: number of points for generated sets, else a random subset of the training split
    drawn from ``seed`` (test splits are kept whole). ``seed`` also draws the generated sets.
    ``data_root``/``download``/``check_integrity`` concern the torchvision sets
    (``check_integrity=False`` skips only torchvision's md5 comparison). ``noise`` is the
    two-moons noise. ``loss`` (``"ce"`` or ``"mse"``) decides how labels are validated.
    Train and test splits are checked with :func:`validate_arrays`; every problem in the
    arguments or the data raises :class:`~global_convergence.errors.UserInputError`.
    """
    loss = check_loss(loss)
    _check_options(name, n, seed)
    key = name.strip().lower()
    if noise is not None and key != "two-moons":
        raise UserInputError(f"noise={noise!r} was given for dataset {name!r}; noise applies "
                             "only to 'two-moons'")
    if is_npz_path(name):
        ds = load_npz(name, loss=loss, n=n, seed=seed)
    elif key in _GENERATED:
        ds = generate(key, n, seed, noise)
    elif key == "digits":
        ds = digits(n, seed)
    elif key in VISION:
        ds = load_vision(key, n=n, seed=seed, data_root=data_root, download=download,
                         check_integrity=check_integrity)
    else:
        raise UserInputError(f"dataset {name!r} is not known; expected one of "
                             f"{', '.join(DATASET_NAMES)} or the path of a .npz file")
    validate_dataset(ds, loss)
    return ds


def _check_options(name: object, n: object, seed: object) -> None:
    """Types of the arguments shared by every data set."""
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(f"dataset name {name!r} is not valid; expected one of "
                             f"{', '.join(DATASET_NAMES)} or the path of a .npz file")
    if n is not None:
        check_n(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"seed={seed!r} is not valid; expected an integer >= 0")


def validate_dataset(ds: Dataset, loss: str) -> None:
    """:func:`validate_arrays` on the training split and, when there is one, the test split."""
    labels_loss = "ce" if not ds.y_train.is_floating_point() else loss
    validate_arrays(ds.x_train, ds.y_train, loss=labels_loss, name=ds.name,
                    num_classes=ds.num_classes)
    if ds.x_test is None or ds.y_test is None:
        return
    validate_arrays(ds.x_test, ds.y_test, loss=labels_loss, name=f"{ds.name} test set",
                    num_classes=ds.num_classes)
    if tuple(ds.x_test.shape[1:]) != ds.input_shape:
        raise UserInputError(f"{ds.name} test set: inputs have shape {tuple(ds.x_test.shape[1:])};"
                             f" expected {ds.input_shape} like the training set")
