"""The in-memory :class:`Dataset` every loader of this package returns."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserInputError


@dataclass
class Dataset:
    """A whole data set held as tensors.

    ``y_train`` / ``y_test`` hold either ``int64`` class labels ``0..num_classes-1`` (shape
    ``(n,)``) or ``float32`` real targets of shape ``(n, m_y)`` (``loss="mse"`` on real values,
    ``num_classes`` then ``None``). The dtype says which: integer labels are labels even when the
    loss is ``mse`` (the training code maps them to targets, docs/design.md).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    num_classes: int | None
    note: str = ""
    augment: str | None = None

    @property
    def n(self) -> int:
        """Number of training points."""
        return int(self.x_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(2,)`` or ``(3, 32, 32)``."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def output_dim(self) -> int:
        """``m_y``, the number of outputs: 1 for 2 classes, C for C > 2 classes, ``y.shape[1]`` for targets."""
        if self.y_train.is_floating_point():
            return int(self.y_train.shape[1])
        if self.num_classes is None:
            raise ValueError(f"dataset {self.name!r} has integer labels but no num_classes")
        return 1 if self.num_classes == 2 else int(self.num_classes)


def choose_subset(total: int, n: int | None, seed: int, name: str) -> np.ndarray | None:
    """Indices of a seeded random subset of ``n`` of ``total`` points, in their original order.

    ``None`` when ``n`` is ``None`` (keep everything). Raises :class:`UserInputError` when ``n``
    is below 2 or above ``total``.
    """
    if n is None:
        return None
    check_n(n)
    if n > total:
        raise UserInputError(f"n={n} exceeds the {total} training points of dataset {name!r}; "
                             f"expected 2 <= n <= {total}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False))


def check_n(n: object) -> int:
    """``n`` as an int; :class:`UserInputError` unless it is an integer >= 2."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise UserInputError(f"n={n!r} is not an integer; expected an integer >= 2")
    if n < 2:
        raise UserInputError(f"n={n} is too small; expected an integer >= 2")
    return int(n)
