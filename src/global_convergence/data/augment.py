"""Batch-level data augmentation on tensors, on any device (``--augment``).

- ``"crop-flip"`` (CIFAR): random crop with zero padding, then a random horizontal flip.
- ``"crop"`` (digit-like images: MNIST, KMNIST, SVHN, Semeion, digits): the random crop only;
  digits are never mirrored.

Padding is 4 pixels, or 2 for images of at most 16×16 pixels. Each sample gets its own offsets
(uniform in ``0..2·padding`` per axis) and flip (probability 1/2), drawn in one call each from
``generator`` (on the generator's device) — so equal generator states give equal results — and
applied to the whole batch at once by advanced indexing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserInputError

AUGMENTATIONS = ("crop-flip", "crop")


def crop_padding(height: int, width: int) -> int:
    """Zero padding of the random crop: 2 for images of at most 16×16 pixels, else 4."""
    return 2 if max(height, width) <= 16 else 4


def _random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample random crops of ``x`` (N, C, H, W) padded with ``padding`` zeros per side."""
    n, c, h, w = x.shape
    device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    offsets = offsets.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)         # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)         # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each sample of ``x`` left-right with probability 1/2."""
    device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, kind: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A randomly augmented copy of the image batch ``x`` (N, C, H, W); ``kind`` as above.

    ``generator`` (any device) makes the result reproducible; ``None`` uses the global RNG of
    ``x``'s device. The output has ``x``'s shape, dtype and device.
    """
    if kind not in AUGMENTATIONS:
        raise UserInputError(f"augmentation {kind!r} is not known; expected one of "
                             f"{', '.join(AUGMENTATIONS)}")
    if x.ndim != 4:
        raise UserInputError(f"augmentation {kind!r} got a batch of shape {tuple(x.shape)}; "
                             "expected images (N, C, H, W)")
    out = _random_crop(x, crop_padding(x.shape[2], x.shape[3]), generator)
    if kind == "crop-flip":
        out = _random_flip(out, generator)
    return out
