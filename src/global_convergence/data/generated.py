"""Data sets made on the spot, needing no files.

- ``two-moons``: :func:`sklearn.datasets.make_moons`, ``noise=None`` by default, no test set.
- ``sine``: ``x ~ U[-1, 1]``, ``y = 1{sin(20 x) < 0}``, no test set.
- ``random``: 16×16×1 images of ``N(0, 1)`` pixels with uniform labels in {0, 1}, no test set.
- ``digits``: the offline stand-in for Semeion, scikit-learn's 8×8 digits (shipped with
  scikit-learn) upsampled bilinearly to 16×16, in [0, 1], split 1000 train / 797 test.

The first three are drawn from ``seed``; the digits split is fixed (:data:`DIGITS_SPLIT_SEED`)
and ``seed`` only picks the subset when ``n`` is given.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError
from .core import Dataset, check_n, choose_subset

DEFAULT_N = {"two-moons": 100, "sine": 100, "random": 1000}
"""Number of points generated when ``n`` is not given."""

SINE_FREQUENCY = 20.0
DIGITS_TRAIN = 1000
DIGITS_SPLIT_SEED = 0
"""Seed of the fixed digits train/test permutation, independent of the ``seed`` argument."""

DIGITS_NOTE = ("offline stand-in: scikit-learn digits (8x8, upsampled bilinearly to 16x16) "
               "replaces Semeion")


def two_moons(n: int | None, seed: int, noise: float | None) -> Dataset:
    """``make_moons(n_samples=n, noise=noise, random_state=seed)`` as float32 (n, 2) / int64."""
    from sklearn.datasets import make_moons

    if noise is not None and (isinstance(noise, bool) or not isinstance(noise, (int, float))
                              or not 0 <= noise < float("inf")):
        raise UserInputError(f"noise={noise!r} is not valid; expected a finite number >= 0")
    n = check_n(DEFAULT_N["two-moons"] if n is None else n)
    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    note = "" if noise is None else f"noise={noise}"
    return Dataset("two-moons", torch.from_numpy(x.astype(np.float32)),
                   torch.from_numpy(y.astype(np.int64)), None, None, 2, note=note)


def sine(n: int | None, seed: int) -> Dataset:
    """``x ~ U[-1, 1]`` of shape (n, 1), ``y = 1{sin(20 x) < 0}`` computed on the float32 x."""
    n = check_n(DEFAULT_N["sine"] if n is None else n)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, 1)).astype(np.float32)
    y = (np.sin(SINE_FREQUENCY * x[:, 0].astype(np.float64)) < 0).astype(np.int64)
    return Dataset("sine", torch.from_numpy(x), torch.from_numpy(y), None, None, 2)


def random_images(n: int | None, seed: int) -> Dataset:
    """Pixels ``N(0, 1)`` of shape (n, 1, 16, 16) and labels uniform in {0, 1}."""
    n = check_n(DEFAULT_N["random"] if n is None else n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 16, 16), generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    return Dataset("random", x, y, None, None, 2)


def generate(name: str, n: int | None, seed: int, noise: float | None) -> Dataset:
    """One of the generated sets by name (``two-moons``, ``sine``, ``random``)."""
    if name == "two-moons":
        return two_moons(n, seed, noise)
    if name == "sine":
        return sine(n, seed)
    return random_images(n, seed)


def digits(n: int | None, seed: int) -> Dataset:
    """The Semeion stand-in: 1797 digits, (N, 1, 16, 16) in [0, 1], 1000 train / 797 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y)))
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    pick = choose_subset(len(train), n, seed, "digits")
    if pick is not None:
        train = train[torch.from_numpy(pick)]
    return Dataset("digits", x[train].contiguous(), y[train], x[test].contiguous(), y[test], 10,
                   note=DIGITS_NOTE, augment="crop")
