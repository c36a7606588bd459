"""The phase-2 feature cache: the frozen trunk's features of every training (and test) input.

In the second phase of both methods only the head trains on a fixed trunk ([KS21] §4, [K22]
§3.2.1), so without augmentation the trunk features ``z̄`` of the whole training (and test) set are
computed once at the switch and the head trains on them. They are kept in memory or written
chunk by chunk to float32 ``.npy`` files (``feature_cache``; see :mod:`.storage`). Under DDP each
rank computes its chunks and every rank receives all of them: the same features one process has.
"""
from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .distributed import assemble_chunks, broadcast_object, owns_chunk, stream_chunks
from .evaluation import evaluation_mode
from .storage import Features, cache_storage, open_feature_file, read_rows, remove_files

if TYPE_CHECKING:
    from .build import Run

CACHE_FILE = "feature-cache-{split}{rank}.npy"
"""On-disk feature cache of a split (``-rank<r>`` under DDP: every rank writes its own copy)."""


@dataclass(eq=False)
class FeatureCache:
    """Trunk features ``z̄`` of the training (and test) inputs under the frozen trunk: tensors, or
    memmaps of the float32 ``files`` (in ``folder`` when it is a temporary one). :meth:`close`,
    or garbage collection, deletes the files and the temporary folder."""

    train: Features
    test: Features | None
    files: list[Path] = field(default_factory=list)
    folder: Path | None = None

    def __post_init__(self) -> None:
        self._cleanup = weakref.finalize(self, remove_files, list(self.files), self.folder)

    def close(self) -> None:
        self._cleanup()

    def train_tensor(self) -> torch.Tensor:
        """The training features as one tensor (a view of the memmap for a disk cache)."""
        train = self.train
        return train if isinstance(train, torch.Tensor) else torch.from_numpy(np.asarray(train))


def build_feature_cache(run: "Run") -> FeatureCache | None:
    """Trunk features of every training (and test) input, once, under the frozen trunk: in memory,
    or written chunk by chunk to float32 files (``feature_cache``). None when phase 2 runs the
    trunk in every step: augmentation, ``feature_cache="off"``, or a model without a trunk."""
    if run.config.feature_cache_mode == "off" or run.config.augment or run.split is None:
        return None
    with evaluation_mode(run.model):
        if _cache_storage(run) == "disk":
            return _disk_feature_cache(run)
        train = _trunk_features(run, run.x)
        test = _trunk_features(run, run.x_test) if run.x_test is not None else None
    return FeatureCache(train, test)


def close_cache(run: "Run") -> None:
    """Drop the run's feature cache and delete its files, if it has any."""
    if run.cache is not None:
        run.cache.close()
        run.cache = None


def cached_train_features(run: "Run") -> torch.Tensor | None:
    """The cached float32 trunk features of the training inputs as one tensor, or None."""
    return None if run.cache is None else run.cache.train_tensor()


def _cache_storage(run: "Run") -> str:
    """``memory`` or ``disk``; for ``auto`` the size follows from the features of one input, and
    under DDP rank 0's choice holds on every rank."""
    choice = run.config.feature_cache_mode
    if choice != "auto":
        return choice
    row = run.split.features(read_rows(run.x, 0, 1, run.ctx.device))
    rows = len(run.x) + (len(run.x_test) if run.x_test is not None else 0)
    return broadcast_object(cache_storage(choice, rows * row.numel() * row.element_size(),
                                          run.ctx.device), run.ctx)


def _trunk_features(run: "Run", x: torch.Tensor) -> torch.Tensor:
    """Trunk features of ``x`` in chunks; under DDP each rank computes its chunks and every rank
    receives all of them (the same tensor one process computes)."""
    sizes = _chunk_sizes(len(x), run.eval_chunk)
    parts = {k: _chunk_features(run, x, k) for k in range(len(sizes)) if owns_chunk(k, run.ctx)}
    return assemble_chunks(parts, sizes, run.ctx)


def _chunk_features(run: "Run", x: torch.Tensor, k: int) -> torch.Tensor:
    chunk = run.eval_chunk
    return run.split.features(read_rows(x, k * chunk, (k + 1) * chunk, run.ctx.device))


def _chunk_sizes(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - start) for start in range(0, n, chunk)]


def _disk_feature_cache(run: "Run") -> FeatureCache:
    """The features in float32 ``.npy`` files in ``run.cache_dir`` (else a temporary folder)."""
    temporary = Path(tempfile.mkdtemp(prefix="gconv-features-")) if run.cache_dir is None else None
    folder = run.cache_dir if temporary is None else temporary
    rank = f"-rank{run.ctx.rank}" if run.ctx.distributed else ""
    inputs = {"train": run.x, "test": run.x_test}
    files = {split: folder / CACHE_FILE.format(split=split, rank=rank)
             for split, x in inputs.items() if x is not None}
    try:
        arrays = {split: _write_trunk_features(run, inputs[split], path)
                  for split, path in files.items()}
    except BaseException:
        remove_files(list(files.values()), temporary)
        raise
    return FeatureCache(arrays["train"], arrays.get("test"), list(files.values()), temporary)


def _write_trunk_features(run: "Run", x: torch.Tensor, path: Path) -> np.memmap:
    """Trunk features of ``x`` written to ``path`` one chunk at a time (under DDP each chunk is
    computed on its rank and broadcast, as in :func:`_trunk_features`)."""
    out, start = None, 0
    sizes = _chunk_sizes(len(x), run.eval_chunk)
    for part in stream_chunks(lambda k: _chunk_features(run, x, k), sizes, run.ctx):
        if out is None:
            out = open_feature_file(path, len(x), tuple(part.shape[1:]))
        out[start:start + len(part)] = part.float().cpu().numpy()
        start += len(part)
    out.flush()
    return out
