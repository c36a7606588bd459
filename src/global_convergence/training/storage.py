"""Where the loop's inputs and phase-2 features live, and how a batch of them reaches the device.

Inputs (``data_on_device``): on the training device, or — on CUDA, when they are too large for it
or the user says so — in pinned CPU memory, from which each batch is gathered on the CPU and
copied without blocking. Phase-2 trunk features (``feature_cache``): a tensor in memory, or a
float32 ``.npy`` file opened as a numpy memmap, written chunk by chunk and read per batch.
Memory and disk hold the same float32 values, so they give the same numbers.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

Features = torch.Tensor | np.ndarray
"""Rows of inputs or features: a tensor, or a numpy array (a memmap of a ``.npy`` file)."""

DEVICE_DATA_FRACTION = 0.5
"""``data_on_device="auto"`` copies the inputs to a CUDA device when they take at most this
fraction of its free memory (after the model is on it); else they stay in pinned CPU memory."""
CACHE_MEMORY_BUDGET: int | None = None
"""Bytes up to which ``feature_cache="auto"`` keeps the cache in memory; None: the default below."""
CACHE_MEMORY_FRACTION = 0.5
"""Default budget: this fraction of the free CUDA memory, or on the CPU of the available RAM
(psutil where installed, else the free pages ``os.sysconf`` reports, else ``CACHE_MEMORY_BYTES``)."""
CACHE_MEMORY_BYTES = 2 * 2**30


# -- inputs ------------------------------------------------------------------------------------
def inputs_on_device(choice: str, nbytes: int, device: torch.device,
                     free_bytes: int | None = None) -> bool:
    """Whether inputs of ``nbytes`` go to ``device`` (``choice``: auto | yes | no). Always True
    off CUDA; ``auto`` compares with ``DEVICE_DATA_FRACTION`` of ``free_bytes`` (default: the
    device's free memory, ``torch.cuda.mem_get_info``)."""
    if device.type != "cuda" or choice == "yes":
        return True
    if choice == "no":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return nbytes <= DEVICE_DATA_FRACTION * free_bytes


def place_inputs(x: torch.Tensor, on_device: bool, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``, or on the CPU (pinned when ``device`` is CUDA and CUDA is available)."""
    if on_device:
        return x.to(device)
    x = x.cpu()
    if device.type == "cuda" and torch.cuda.is_available():
        x = x.pin_memory()
    return x


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- moving rows to the device -----------------------------------------------------------------
def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for CUDA is pinned (if it is not) and copied with
    ``non_blocking=True``."""
    if t.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_available():
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def gather_rows(source: Features, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``index`` of ``source``, gathered where ``source`` lives, on ``device``."""
    if isinstance(source, np.ndarray):
        rows = torch.from_numpy(np.asarray(source[index.cpu().numpy()]))
    else:
        rows = source[index.to(source.device)]
    return to_device(rows, device)


def read_rows(source: Features, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of ``source`` on ``device`` (a copy when read from a numpy array)."""
    if isinstance(source, np.ndarray):
        return to_device(torch.from_numpy(np.array(source[start:stop])), device)
    return to_device(source[start:stop], device)


def chunk_count(source: Features, size: int) -> int:
    return math.ceil(len(source) / size)


# -- the feature cache -------------------------------------------------------------------------
def memory_budget(device: torch.device) -> int:
    """Bytes ``feature_cache="auto"`` may keep in memory on ``device`` (see the constants)."""
    if CACHE_MEMORY_BUDGET is not None:
        return CACHE_MEMORY_BUDGET
    if device.type == "cuda":
        return int(CACHE_MEMORY_FRACTION * torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
        return int(CACHE_MEMORY_FRACTION * psutil.virtual_memory().available)
    except ImportError:
        pass
    try:        # free physical memory (POSIX; page cache not counted, so on the safe side)
        return int(CACHE_MEMORY_FRACTION * os.sysconf("SC_AVPHYS_PAGES")
                   * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return CACHE_MEMORY_BYTES


def cache_storage(choice: str, nbytes: int, device: torch.device) -> str:
    """``memory`` or ``disk`` for a cache of ``nbytes`` (``choice``: memory | disk | auto)."""
    if choice != "auto":
        return choice
    return "memory" if nbytes <= memory_budget(device) else "disk"


def open_feature_file(path: Path, rows: int, shape: tuple[int, ...]) -> np.memmap:
    """A new float32 ``.npy`` file of ``rows × shape``, opened read-write as a memmap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, *shape))


def remove_files(files: list[Path], folder: Path | None) -> None:
    """Delete ``files`` and then ``folder`` (a temporary folder) if given; missing ones are fine."""
    for path in files:
        path.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
