"""LeNet-5 on 16×16 inputs with width multiplier ``m_c`` ([K22] Fig. 1b,c)."""
from __future__ import annotations

from torch import nn

from .analytic import SOFTPLUS_BETA, softplus

LENET_FILTERS = 8
"""Filters per convolution at ``m_c = 1``."""
LENET_UNITS = 128
"""Units per hidden fully connected layer at ``m_c = 1``."""


class LeNet(nn.Sequential):
    """LeNet-5: two 5×5 convolutions with 2×2 average pooling, two hidden FC layers, output.

    ``8·m_c`` filters per convolution and ``128·m_c`` units per hidden FC layer, softplus(ς)
    everywhere, average (not max) pooling so that the network is real analytic. Built for
    16×16 inputs (Semeion); other sizes work as long as both poolings leave at least 1×1.
    """

    def __init__(self, in_channels: int, out_features: int, width: int = 1,
                 image_size: int = 16, beta: float = SOFTPLUS_BETA) -> None:
        if width < 1:
            raise ValueError(f"LeNet width multiplier m_c must be >= 1, got {width}")
        filters, units = LENET_FILTERS * width, LENET_UNITS * width
        side = ((image_size // 2) - 4) // 2     # conv(pad 2) → pool → conv(no pad) → pool
        if side < 1:
            raise ValueError(f"LeNet needs inputs of at least 12×12 pixels, got {image_size}")
        super().__init__(
            nn.Conv2d(in_channels, filters, 5, padding=2), softplus(beta), nn.AvgPool2d(2),
            nn.Conv2d(filters, filters, 5), softplus(beta), nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(filters * side * side, units), softplus(beta),
            nn.Linear(units, units), softplus(beta),
            nn.Linear(units, out_features),
        )
