"""The user's own data in a ``.npz`` file.

Arrays: ``x`` (n × features or n × C × H × W) and ``y``; optionally ``x_test`` and ``y_test``.
With ``loss="ce"`` ``y`` holds integer class labels (an integer dtype, or floats with integral
values) and ``num_classes = max(y_train) + 1``, computed on the whole file before any ``n``
subset; test labels must lie in the same range. With ``loss="mse"`` a float ``y`` holds real
targets (a 1-D ``y`` becomes ``(n, 1)``, ``num_classes`` is ``None``); an integer ``y`` is still
class labels and ``num_classes`` is reported. The file is validated as it is read.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

from ..errors import UserInputError
from .core import Dataset, choose_subset
from .validation import validate_arrays


def is_npz_path(name: str) -> bool:
    """Whether a dataset name is the path of a user's ``.npz`` file."""
    return name.lower().endswith(".npz")


def _read_arrays(path: str, name: str) -> dict[str, np.ndarray]:
    """The arrays of the file, without pickled objects; one-line errors for unreadable files."""
    if not os.path.isfile(path):
        raise UserInputError(f"{name}: file {path!r} does not exist; expected a .npz file with "
                             "arrays 'x' and 'y'")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        detail = " ".join(str(err).split())
        raise UserInputError(f"{name}: {path!r} could not be read as a .npz file ({detail}); "
                             "expected numpy.savez output") from err
    for key in ("x", "y"):
        if key not in arrays:
            raise UserInputError(f"{name}: array {key!r} is missing (found {sorted(arrays)}); "
                                 "expected arrays 'x' and 'y', optionally 'x_test' and 'y_test'")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UserInputError(f"{name}: only one of 'x_test' and 'y_test' is present; expected "
                             "both or neither")
    return arrays


def _holds_labels(y: np.ndarray, loss: str) -> bool:
    """Whether ``y`` is class labels: always for ce, for mse when it is a 1-D integer vector."""
    return loss == "ce" or (y.dtype.kind in "biu" and y.ndim == 1)


def _to_tensor(y: np.ndarray, labels: bool) -> torch.Tensor:
    """``y`` as int64 labels (n,), or as float32 targets (n, m_y)."""
    if labels:
        return torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def load_npz(path: str, *, loss: str, n: int | None, seed: int) -> Dataset:
    """Read, validate and convert a user's ``.npz`` file; ``n`` picks a seeded training subset."""
    path = os.path.abspath(os.path.expanduser(path))
    name = f"npz:{path}"
    arrays = _read_arrays(path, name)
    x, y = arrays["x"], arrays["y"]
    labels = _holds_labels(y, loss)
    validate_arrays(x, y, loss=loss if labels else "mse", name=name)
    num_classes = int(y.max()) + 1 if labels else None
    x_test = y_test = None
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        validate_arrays(x_test, y_test, loss=loss if labels else "mse", name=f"{name} test set",
                        num_classes=num_classes)
        _check_test_shapes(x, y, x_test, y_test, name)
    pick = choose_subset(len(y), n, seed, name)
    if pick is not None:
        x, y = x[pick], y[pick]
    return Dataset(name, _to_float(x), _to_tensor(y, labels),
                   None if x_test is None else _to_float(x_test),
                   None if y_test is None else _to_tensor(y_test, labels),
                   num_classes, note=f"user data from {path}")


def _to_float(x: np.ndarray) -> torch.Tensor:
    """Inputs as a contiguous float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _check_test_shapes(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                       name: str) -> None:
    """The test split's sample shape (and target width) equal the training split's."""
    if x_test.shape[1:] != x.shape[1:]:
        raise UserInputError(f"{name}: x_test has samples of shape {tuple(x_test.shape[1:])}; "
                             f"expected {tuple(x.shape[1:])} like x")
    if y_test.shape[1:] != y.shape[1:]:
        raise UserInputError(f"{name}: y_test has samples of shape {tuple(y_test.shape[1:])}; "
                             f"expected {tuple(y.shape[1:])} like y")
