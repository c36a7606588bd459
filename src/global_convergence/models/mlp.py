"""The fully connected network of [K22] section 2.2: three hidden layers of 300 softplus units."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .analytic import SOFTPLUS_BETA, softplus

MLP_HIDDEN = (300, 300, 300)
"""'four layers with 300 neurons per hidden layer' read as 3 hidden + the output layer (docs/design.md)."""


class MLP(nn.Sequential):
    """``Flatten → (Linear → softplus) × len(hidden) → Linear`` on inputs of any shape.

    An ``nn.Sequential``, so the last two fully connected layers are visible to
    :func:`ee_model` and :func:`two_phase_model`.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = MLP_HIDDEN,
                 beta: float = SOFTPLUS_BETA) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), softplus(beta)]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


def input_features(input_shape: Sequence[int]) -> int:
    """Number of features of one input of the given shape."""
    return int(math.prod(input_shape))
