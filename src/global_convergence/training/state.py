"""What a checkpoint of ``gconv train`` holds, and how a run is saved and restored as a whole.

A checkpoint is one flat dictionary: ``format``, ``config``, the model's and the wrapper's (or
the plain optimizer's) state dicts, the fields of :class:`RunState` and the RNG states
(:func:`.checkpoint.save_checkpoint`). Restoring it replays exactly the run that wrote it:
``--resume`` reaches the result an uninterrupted run gives, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NumericalError, UserInputError
from .checkpoint import restore_rng, save_checkpoint
from .config import TrainConfig
from .distributed import barrier
from .phase2 import sync_model

if TYPE_CHECKING:
    from .build import Run

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
RESULT_INSENSITIVE = {"device", "data_root", "download", "checkpoint_every", "log_every",
                      "data_on_device"}
"""Options a resumed run may change: they do not alter the numbers a run produces."""


def _no_seconds() -> dict[str, float]:
    return {"phase1": 0.0, "phase2": 0.0, "switch": 0.0, "evaluation": 0.0}


@dataclass
class RunState:
    """Everything of a run that changes while it trains and goes into its checkpoint (besides
    the model, optimizer and wrapper state dicts and the RNG states)."""

    step: int = 0
    """Steps taken."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The logged metrics rows so far (``metrics.csv``)."""
    q_t: int = 0
    """Failed alignment checks so far: [K22]'s ``Q_T`` (§2.2)."""
    alignment_checks: int = 0
    certificate: dict[str, Any] | None = None
    """The certificate made at the switch (JSON-ready), None before it or without one."""
    seconds: dict[str, float] = field(default_factory=_no_seconds)
    """Wall-clock seconds spent in ``phase1``, ``phase2``, at the ``switch`` and in ``evaluation``."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as the checkpoint's top-level keys (the values themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "RunState":
        """The state of a checkpoint; ``seconds`` it lacks (older checkpoints) count from 0."""
        values = {f.name: saved[f.name] for f in fields(cls) if f.name != "seconds"}
        return cls(**values, seconds={**_no_seconds(), **saved["seconds"]})


def checkpoint_state(run: "Run") -> dict[str, Any]:
    """The checkpoint of ``run`` (without RNG states, which :func:`save_checkpoint` adds)."""
    return {"format": CHECKPOINT_FORMAT, "config": run.config.to_dict(),
            "model": run.model.state_dict(),
            "wrapper": run.wrapper.state_dict() if run.wrapper else None,
            "optimizer": run.optimizer.state_dict() if run.wrapper is None else None,
            **run.state.to_dict()}


def write_checkpoint(run: "Run", out: Path | None, phase: int | None = None) -> None:
    """Save the run's state, after checking that every parameter is finite: a checkpoint is
    always a good one (``phase``: that of the step just taken, for the error message)."""
    if run.phase == 2:
        sync_model(run)
    check_parameters(run, run.phase if phase is None else phase, out)
    if out is not None and run.ctx.is_main:
        save_checkpoint(out / CHECKPOINT_NAME, checkpoint_state(run))
    run.checkpoint_step = run.state.step
    barrier(run.ctx)


def restore(run: "Run", state: dict[str, Any]) -> None:
    """Continue ``run`` from a checkpoint of the same configuration."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserInputError(f"the checkpoint is not one of gconv train (format {found!r}); expected "
                             f"format {CHECKPOINT_FORMAT}")
    check_same_options(TrainConfig.from_dict(state["config"]), run.config, "the checkpoint's")
    run.model.load_state_dict(state["model"])
    if run.wrapper is not None:
        run.wrapper.load_state_dict(state["wrapper"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.state = RunState.from_dict(state)
    if run.wrapper is not None and run.wrapper.certificate is None:
        run.wrapper.certificate = run.state.certificate    # wrapper states from before certify
    run.checkpoint_step = run.state.step
    restore_rng(state["rng"])


def check_same_options(saved: TrainConfig, current: TrainConfig, whose: str) -> None:
    """Refuse to continue a run whose result-altering options differ from ``saved``."""
    before, now = result_options(saved), result_options(current)
    changed = [k for k, v in now.items() if before.get(k) != v]
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UserInputError(f"--resume with options that differ from {whose} ({details})")


def result_options(config: TrainConfig) -> dict[str, Any]:
    """The options that alter a run's numbers. Of the feature cache only whether there is one
    counts: memory and disk hold the same float32 features."""
    options = {k: v for k, v in config.to_dict().items() if k not in RESULT_INSENSITIVE}
    del options["feature_cache"]
    options["cache_features"] = config.feature_cache_mode != "off"
    return options


def check_parameters(run: "Run", phase: int, out: Path | None) -> None:
    """A finite loss can still be followed by an update to inf/NaN parameters: never checkpoint
    (or certify) those."""
    named = list(run.model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]) if named else None
    if finite is not None and not bool(finite.all()):     # one device sync, not one per tensor
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NumericalError(f"parameters became non-finite at step {run.state.step} (phase "
                             f"{phase}): {names}; {last_good(run, out)}. Lower --lr or check the "
                             "data.")


def last_good(run: "Run", out: Path | None) -> str:
    """Where the last good checkpoint is, for an error message."""
    if out is not None and run.checkpoint_step is not None and (out / CHECKPOINT_NAME).exists():
        return (f"the last good checkpoint (step {run.checkpoint_step}) is kept in "
                f"{out / CHECKPOINT_NAME}")
    return "no checkpoint was written"
