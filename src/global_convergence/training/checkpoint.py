"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A crash during a write leaves the previous checkpoint intact; ``os.replace`` is atomic on POSIX.
The checkpoint holds everything a run needs to continue exactly: model, optimizers and wrapper
(phase, gates), step, metrics so far, and the RNG states of torch, CUDA, NumPy and Python.
"""
from __future__ import annotations

import contextlib
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
    try:   # weights_only: tensors, plain containers and numpy arrays; loading runs no pickled code
        with _numpy_arrays_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:
            raise UserInputError(
                f"checkpoint {path} is unreadable (it holds pickled Python objects "
                f"({found.group(1)}), which are not loaded since loading them could run code; gconv "
                "checkpoints hold tensors and plain values only)") from exc
        raise UserInputError(f"checkpoint {path} is unreadable ({_first_line(exc)})") from exc
    except Exception as exc:     # torch raises several types for truncated or foreign files
        raise UserInputError(f"checkpoint {path} is unreadable ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _numpy_arrays_allowed():
    """Let ``weights_only`` loading rebuild numpy arrays (checkpoints written before numpy's
    RNG state was stored as a tensor hold one); rebuilding an array runs no user code."""
    reconstruct = np.zeros(1).__reduce__()[0]
    allowed = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if hasattr(torch.serialization, "safe_globals"):              # torch >= 2.5
        return torch.serialization.safe_globals(allowed)
    torch.serialization.add_safe_globals(allowed)                # torch 2.4: no context manager
    return contextlib.nullcontext()


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
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
             n["cached_gaussian"])
    np.random.set_state(n)           # else numpy's own tuple (checkpoints of earlier versions)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():     # as many devices as both machines have
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
