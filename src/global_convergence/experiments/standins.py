"""The data of the reproductions: torchvision sets checked up front, and the offline stand-ins the
``cpu`` and ``smoke`` presets use where the papers' sets need a download (docs/reproduction.md).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data import load_dataset, resolve_data_root
from ..data.vision import VISION
from ..errors import UserInputError
from ..training import TrainConfig

if TYPE_CHECKING:
    from .subruns import Context


def require_datasets(ctx: Context, names: Iterable[str]) -> None:
    """Fail early, in one line, when a torchvision data set of the preset is not in the data root."""
    missing: list[str] = []
    first: str = ""
    for name in dict.fromkeys(names):
        if name not in VISION:
            continue
        try:
            load_dataset(name, n=2, data_root=ctx.data_root)
        except UserInputError as err:
            missing.append(name)
            first = first or str(err)
    if missing:
        raise UserInputError(
            f"{ctx.experiment} --preset {ctx.preset} needs {', '.join(missing)}, not found in "
            f"--data-root {resolve_data_root(ctx.data_root)} (first problem: {first}); download "
            "them there with torchvision on a machine with internet, or run --preset cpu, which "
            "uses offline stand-ins")


SMALL_DIGITS = "digits-small"
"""Smoke presets only: the first :data:`SMALL_DIGITS_SIZE` training and test digits as a ``.npz``
(the full digits test set would dominate a seconds-long ResNet run; no augmentation applies)."""


SMALL_DIGITS_SIZE = 64


def data_arg(ctx: Context, name: str) -> str:
    """The ``data`` option of a run for a preset's data-set name (``digits-small`` → its file)."""
    if name != SMALL_DIGITS:
        return name
    path = ctx.out / "data" / f"{SMALL_DIGITS}.npz"
    if not path.is_file():
        ds = load_dataset("digits")
        k = SMALL_DIGITS_SIZE
        _save_npz(path, x=ds.x_train[:k].numpy(), y=ds.y_train[:k].numpy(),
                  x_test=ds.x_test[:k].numpy(), y_test=ds.y_test[:k].numpy())
    return str(path.resolve())


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def data_note(name: str, data_root: str | None) -> str:
    """How a data-set name of a preset is obtained, for the report."""
    if name == SMALL_DIGITS:
        return (f"**smoke-test stand-in**: the first {SMALL_DIGITS_SIZE} training and "
                f"{SMALL_DIGITS_SIZE} test images of the digits stand-in for Semeion")
    if name == "digits":
        return ("**offline stand-in**: scikit-learn's 8×8 digits upsampled to 16×16 "
                "(1000 train / 797 test) replace Semeion")
    if name in ("two-moons", "sine", "random"):
        return "generated (global_convergence.data)"
    if name in VISION:
        return f"torchvision files from {resolve_data_root(data_root)}"
    return name


BINARY_RULE = "y = 1 if the digit is ≥ 5, else 0"
"""How a 10-class digit set becomes the y ∈ {0, 1} task of [K22] Fig. 1b,c (the paper does not say)."""


def binary_labels_file(ctx: Context, source: str) -> str:
    """Write ``source`` (``digits`` or ``semeion``) with labels :data:`BINARY_RULE` as a ``.npz``
    under ``OUT/data/`` and return its path (the user-data route of ``load_dataset``)."""
    path = ctx.out / "data" / f"{source}-binary.npz"
    if not path.is_file():
        ds = load_dataset(source, data_root=ctx.data_root)
        arrays = {"x": ds.x_train.numpy(), "y": (ds.y_train.numpy() >= 5).astype(np.int64)}
        if ds.x_test is not None:
            arrays.update(x_test=ds.x_test.numpy(), y_test=(ds.y_test.numpy() >= 5).astype(np.int64))
        _save_npz(path, **arrays)
    return str(path.resolve())


def training_inputs(config: TrainConfig) -> torch.Tensor:
    """The training inputs a run of ``config`` sees (same data set, n and seed)."""
    ds = load_dataset(config.data, n=config.n, seed=config.seed, data_root=config.data_root,
                      loss=config.loss, noise=config.noise)
    return ds.x_train


PAPER_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
               "semeion": "Semeion", "kmnist": "KMNIST", "svhn": "SVHN",
               "digits": "digits (offline stand-in for Semeion)",
               SMALL_DIGITS: "digits-small (smoke stand-in for Semeion)"}


STAND_INS = {"digits": "semeion", SMALL_DIGITS: "semeion"}
"""Offline stand-ins and the paper's data set whose row they are set beside."""


def paper_row(name: str) -> str:
    """The paper's data set a (possibly stand-in) data set is compared with."""
    return STAND_INS.get(name, name)


def display(name: str) -> str:
    return PAPER_NAMES.get(name, name)
