"""The run's output folder: whether it can be one, and what ``--resume`` finds in it.

A pre-empted job is re-submitted with the same command: ``--resume`` continues from
``OUT/checkpoint.pt`` when there is one and starts the run when the folder holds none yet (the job
was stopped before its first checkpoint). A folder holding another run's files — a checkpoint or
a ``summary.json`` of a different configuration, or results without either — is refused, so one
folder never mixes two runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserInputError
from .config import TrainConfig
from .state import CHECKPOINT_NAME, check_same_options

OUTPUT_FILES = ("metrics.csv", "summary.json", "training.png", "q_t.png", "certificate.png")
"""What a finished run writes besides the checkpoint; a fresh run removes a previous run's copies
first, so that a folder never mixes a new checkpoint with an old summary."""


def check_out(out: str | Path | None) -> Path | None:
    """``out`` as a Path, refused when it cannot become the run's folder."""
    if out is None:
        return None
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise UserInputError(f"--out must name a folder, got {out!r}")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--out {str(out)!r} exists and is not a folder; expected a folder "
                             "(new or from an earlier run)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserInputError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"--out {str(out)!r} cannot be written: no write permission on "
                             f"{str(existing)!r}")
    return path


def has_checkpoint(out: Path, config: TrainConfig) -> bool:
    """What ``--resume`` does with ``out``: True to continue from its checkpoint, False to start
    the run (the folder holds no checkpoint yet). Raises :class:`UserInputError` when the folder
    holds another run's results: a ``summary.json`` of a different configuration, or a
    ``metrics.csv`` without the summary or checkpoint that would say whose it is. A checkpoint of
    a different configuration is refused when it is restored (:func:`.state.restore`)."""
    if (out / CHECKPOINT_NAME).is_file():
        return True
    summary = out / "summary.json"
    if summary.is_file():
        try:
            saved = TrainConfig.from_dict(json.loads(summary.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserInputError(f"--resume: {out} holds a summary.json that is not one of gconv "
                                 f"train ({type(exc).__name__}) and no {CHECKPOINT_NAME}; give "
                                 "another --out or empty the folder") from None
        check_same_options(saved, config, f"the run whose summary.json is in {out}")
    elif (out / "metrics.csv").is_file():
        raise UserInputError(f"--resume: {out} holds a metrics.csv but neither {CHECKPOINT_NAME} "
                             "nor summary.json, so it cannot be told to be this run's; give "
                             "another --out or empty the folder")
    return False
