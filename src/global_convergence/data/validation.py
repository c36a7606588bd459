"""Validation of user-facing arrays: shapes, finite values and class labels.

Every problem raises :class:`~global_convergence.errors.UserInputError` with a one-line message
that starts with the data set's name, names the offending value and says what was expected.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import UserInputError

LOSSES = ("ce", "mse")


def check_loss(loss: object) -> str:
    """``loss`` itself, or :class:`UserInputError` unless it is one of :data:`LOSSES`."""
    if loss not in LOSSES:
        raise UserInputError(f"loss={loss!r} is not known; expected one of {', '.join(LOSSES)}")
    return str(loss)


def _as_numpy(a: Any, what: str, name: str) -> np.ndarray:
    """A numpy view of a tensor / array / nested list; numeric or boolean dtypes only."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise UserInputError(f"{name}: {what} has dtype {arr.dtype}; expected real numbers")
    return arr


def _check_shapes(x: np.ndarray, y: np.ndarray, loss: str, name: str) -> None:
    """Dimensions of x and y, equal lengths, and at least one sample."""
    if x.ndim not in (2, 4):
        raise UserInputError(f"{name}: x has shape {tuple(x.shape)} ({x.ndim}-D); expected 2-D "
                             "(n, features) or 4-D (n, C, H, W)")
    if loss == "ce" and y.ndim != 1:
        raise UserInputError(f"{name}: y has shape {tuple(y.shape)}; loss='ce' expects a 1-D "
                             "vector of class labels")
    if loss == "mse" and y.ndim not in (1, 2):
        raise UserInputError(f"{name}: y has shape {tuple(y.shape)}; loss='mse' expects targets "
                             "of shape (n,) or (n, m_y)")
    if x.shape[0] != y.shape[0]:
        raise UserInputError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]}; "
                             "expected the same number")
    if x.shape[0] == 0:
        raise UserInputError(f"{name}: the dataset is empty (0 samples); expected at least 1")


def _check_finite(a: np.ndarray, what: str, name: str) -> None:
    """Every value of a float array is finite; the message counts NaN and inf values."""
    if a.dtype.kind != "f":
        return
    finite = np.isfinite(a)
    if finite.all():
        return
    n_nan = int(np.isnan(a).sum())
    n_inf = int(finite.size - finite.sum()) - n_nan
    raise UserInputError(f"{name}: {what} has {n_nan} NaN and {n_inf} inf values; expected only "
                         "finite numbers")


def _check_labels(y: np.ndarray, num_classes: int | None, name: str) -> None:
    """Integral labels in ``0..C-1`` with ``C >= 2`` (``C`` is ``max(y) + 1`` unless given)."""
    if y.dtype.kind == "f":
        bad = y != np.round(y)
        if bad.any():
            value = y[bad][0].item()
            raise UserInputError(f"{name}: y has non-integer label {value!r}; loss='ce' expects "
                                 "integer class labels 0..C-1 (use loss 'mse' for real targets)")
    low, high = int(y.min()), int(y.max())
    classes = high + 1 if num_classes is None else int(num_classes)
    if classes < 2:
        raise UserInputError(f"{name}: the labels give {max(classes, 0)} class(es) (largest "
                             f"label {high}); loss='ce' needs at least 2 classes")
    if low < 0 or high >= classes:
        value = low if low < 0 else high
        raise UserInputError(f"{name}: label {value} is outside 0..{classes - 1}; expected class "
                             f"labels 0..{classes - 1}")


def validate_arrays(x: Any, y: Any, *, loss: str, name: str,
                    num_classes: int | None = None) -> None:
    """Check one split (inputs ``x``, labels or targets ``y``) of the data set called ``name``.

    Checks, in order: ``x`` is 2-D ``(n, features)`` or 4-D ``(n, C, H, W)``; ``y`` is 1-D for
    ``ce`` (1-D or 2-D for ``mse``); both have the same first dimension ``n >= 1``; every value
    is finite; for ``ce`` the labels are integral and lie in ``0..C-1`` with ``C >= 2``, where
    ``C`` is ``num_classes`` when given and ``max(y) + 1`` otherwise.
    Accepts tensors, numpy arrays or nested lists; raises :class:`UserInputError`.
    """
    loss = check_loss(loss)
    xa = _as_numpy(x, "x", name)
    ya = _as_numpy(y, "y", name)
    _check_shapes(xa, ya, loss, name)
    _check_finite(xa, "x", name)
    _check_finite(ya, "y", name)
    if loss == "ce":
        _check_labels(ya, num_classes, name)
