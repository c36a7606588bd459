"""Data: generated sets, torchvision sets, the user's ``.npz`` and input validation.

Every loader returns a :class:`Dataset` of in-memory tensors; :func:`load_dataset` is the one
entry point, :func:`augment_batch` the tensor-level augmentation a training loop applies to a
batch, :func:`validate_arrays` the checks applied to every split.
"""
from __future__ import annotations

from .augment import AUGMENTATIONS, augment_batch, crop_padding
from .core import Dataset
from .loading import DATASET_NAMES, load_dataset, validate_dataset
from .validation import LOSSES, validate_arrays
from .vision import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, NORMALIZATION, resolve_data_root

__all__ = [
    "AUGMENTATIONS", "DATASET_NAMES", "DATA_ROOT_ENV", "DEFAULT_DATA_ROOT", "Dataset", "LOSSES",
    "NORMALIZATION", "augment_batch", "crop_padding", "load_dataset", "resolve_data_root",
    "validate_arrays", "validate_dataset",
]
