"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A crash during a write leaves the previous checkpoint intact; ``os.replace`` is atomic on POSIX.
The checkpoint holds everything a run needs to continue exactly: model, optimizers and wrapper
(phase, gates), step, metrics so far, and the RNG states of torch, CUDA, NumPy and Python.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import UserInputError

TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: Path) -> str:
    """Glob pattern of the temporary files :func:`atomic_write` makes for ``path``."""
    return f".{path.name}.*{TEMPORARY_SUFFIX}"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a new temporary file next to ``path``, fsync it, rename it over
    ``path`` and fsync the folder. A crash at any point leaves the old ``path`` (or none) intact
    and at worst a stray temporary file, which :func:`remove_stale_temporaries` clears. The file
    gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``."""
    path = Path(path)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete temporary files that a crashed :func:`atomic_write` of ``folder/name`` left."""
    removed = []
    for name in names:
        for stale in Path(folder).glob(temporary_name(Path(name))):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` (plus RNG states) to ``path`` atomically."""
    rng = capture_rng()
    atomic_write(path, lambda handle: torch.save({**state, "rng": rng}, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no checkpoint at {path}; expected a checkpoint.pt written by gconv train")
    try:   # weights_only: tensors and plain containers only, so loading runs no pickled code
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        raise UserInputError(
            f"checkpoint {path} is unreadable (it holds pickled Python objects"
            f"{f' ({found.group(1)})' if found else ''}, which are not loaded since loading them "
            "could run code; gconv checkpoints hold tensors and plain values only)") from exc
    except Exception as exc:     # torch raises several types for truncated or foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserInputError(f"checkpoint {path} is unreadable ({type(exc).__name__}: "
                             f"{first_line})") from exc


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_rng_state() -> dict[str, Any]:
    """NumPy's legacy global RNG state with its key array as a tensor (loadable with
    ``weights_only=True``)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():     # as many devices as both machines have
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
