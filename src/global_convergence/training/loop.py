"""The training loop behind ``gconv train``: both phases, logging, checkpoints and resume.

A run is built by :mod:`.build`, steps by :mod:`.steps` (phase 1) and :mod:`.phase2` (phase 2),
is evaluated by :mod:`.evaluation`, switches in :mod:`.switch` and checkpoints its
:class:`~.state.RunState` through :mod:`.state`. This module runs the steps in order, logs,
checkpoints and writes the results. Everything that can change the numbers is seeded, so a
resumed run gives the result of an uninterrupted one (docs/design.md).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import NumericalError, UserInputError
from ..losses import Loss
from ..models import flush_denormals
from .build import Run, build_run
from .checkpoint import atomic_write_text, load_checkpoint, remove_stale_temporaries
from .config import TrainConfig
from .distributed import barrier, on_rank_zero
from .evaluation import evaluate, predict
from .feature_cache import build_feature_cache, close_cache
from .folder import OUTPUT_FILES, check_out, has_checkpoint
from .metrics import plot_run, write_metrics
from .phase2 import enter_phase2, phase2_block, phase2_evaluate, phase2_step, sync_model
from .state import (CHECKPOINT_NAME, checkpoint_state, last_good, restore, result_options,
                    write_checkpoint)
from .steps import attach_train_module, closure_step
from .switch import make_certificate, on_switch, track_alignment

__all__ = ["CHECKPOINT_NAME", "Callback", "LogEvent", "Run", "attach_train_module", "build_feature_cache",
           "build_run", "checkpoint_state", "enter_phase2", "evaluate", "make_certificate",
           "predict", "result_options", "sync_model", "train", "train_step"]


@dataclass
class LogEvent:
    """What a callback sees at each logged step; it may add columns to ``row``."""

    step: int
    phase: int
    model: nn.Module
    dataset: Dataset
    loss: Loss
    row: dict[str, Any]


Callback = Callable[[LogEvent], None]


def train(config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
          progress: bool = True, callbacks: list[Callback] | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run ``config`` and return the summary (also written to ``out/summary.json``).

    Runs on the CPU with float32 subnormals flushed to zero (softplus with ς = 100 produces them,
    and they slow every CPU kernel down). ``resume`` continues from ``out/checkpoint.pt``, or
    starts the run when ``out`` holds no checkpoint yet (see :mod:`.folder`). ``stop_after``
    ends the run early after that many steps (with a checkpoint), as an interruption would.
    """
    if not isinstance(config, TrainConfig):
        raise UserInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if stop_after is not None and (not isinstance(stop_after, int) or isinstance(stop_after, bool)
                                   or stop_after < 1):
        raise UserInputError(f"stop_after must be a positive integer, got {stop_after!r}")
    out_path = check_out(out)
    if resume and out_path is None:
        raise UserInputError("--resume needs --out DIR holding checkpoint.pt")
    run = build_run(config)
    run.cache_dir = out_path
    resume = resume and out_path.is_dir() and has_checkpoint(out_path, config)
    if resume:
        restore(run, load_checkpoint(out_path / CHECKPOINT_NAME))
    created = out_path is not None and run.ctx.is_main and not out_path.exists()
    if out_path is not None and run.ctx.is_main:
        out_path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_path, (CHECKPOINT_NAME, *OUTPUT_FILES))
        if not resume:
            for name in OUTPUT_FILES:
                (out_path / name).unlink(missing_ok=True)
    try:
        with flush_denormals(run.ctx.device.type == "cpu"):
            if run.phase == 2:
                enter_phase2(run)
            else:
                attach_train_module(run)
            _loop(run, out_path, callbacks or [], progress, stop_after)
            summary = make_summary(run)
        if out_path is not None and run.ctx.is_main:
            write_outputs(run, out_path, summary)
    except BaseException:
        close_cache(run)
        if created and out_path.is_dir() and not any(out_path.iterdir()):
            out_path.rmdir()        # leave no empty folder behind a run that wrote nothing
        raise
    close_cache(run)
    barrier(run.ctx)
    return summary


def train_step(run: Run) -> float:
    """One step of the run's current phase (phase 2: :func:`.phase2.phase2_step`); returns the
    global-batch mean loss. The caller advances ``run.step``. With the coefficient-space engine
    (:mod:`.kernel_steps`) a phase-2 step leaves the model's parameters as they were: call
    :func:`sync_model` before reading them (the loop does before evaluating and checkpointing)."""
    return phase2_step(run) if run.phase == 2 else closure_step(run)


def _loop(run: Run, out: Path | None, callbacks: list[Callback], progress: bool,
          stop_after: int | None) -> None:
    s, every, state = run.schedule, run.config.checkpoint_every, run.state
    if state.step == 0 and not state.rows:
        log_row(run, callbacks)
    bar = _progress_bar(run, progress)
    last = s.total if stop_after is None else min(s.total, state.step + stop_after)
    while state.step < last:
        phase, started, first = run.phase, time.perf_counter(), state.step
        if phase == 2 and run.kernel is not None:      # the steps up to the next one the loop acts at
            losses = phase2_block(run, _block_end(run, last) - first)
        else:
            losses = [train_step(run)]
        state.step += len(losses)
        state.seconds[f"phase{phase}"] += time.perf_counter() - started
        for k, loss in enumerate(losses):
            if not math.isfinite(loss):
                state.step = first + k + 1
                _check_finite(run, loss, phase, out)
        switched = phase == 1 and run.phase == 2
        if switched:
            on_switch(run, out)
        if _should_log(run):
            row = log_row(run, callbacks)
            _check_finite(run, row["loss"], run.phase, out)
            if bar is not None:
                bar.set_postfix(phase=run.phase, loss=f"{row['loss']:.3g}",
                                error=row["train_error"] if row["train_error"] is None
                                else f"{row['train_error']:.3f}")
        if switched or (every and state.step % every == 0):    # after the log row: it holds
            write_checkpoint(run, out, phase)                    # the switch's alignment check
        if bar is not None:
            bar.update(len(losses))
    if bar is not None:
        bar.close()
    write_checkpoint(run, out)


# -- logging -----------------------------------------------------------------------------------
def log_row(run: Run, callbacks: list[Callback]) -> dict[str, Any]:
    """Evaluate (on every rank, reduced across ranks); alignment checks and callbacks run on
    rank 0, whose row every rank then keeps."""
    started, state = time.perf_counter(), run.state
    figures = phase2_evaluate(run) if run.phase == 2 else evaluate(run)
    row: dict[str, Any] = {"step": state.step, "epoch": state.step / run.schedule.steps_per_epoch,
                           "phase": run.phase, **figures, "alignment_ok": None, "q_t": None}
    every = run.config.track_alignment_every

    def checks_and_callbacks() -> tuple[dict[str, Any], int, int]:
        if every and state.step % every == 0:
            track_alignment(run, row)
        if every:
            row["q_t"] = state.q_t
        for callback in callbacks:
            callback(LogEvent(state.step, run.phase, run.model, run.dataset, run.loss, row))
        return {k: _plain(v) for k, v in row.items()}, state.q_t, state.alignment_checks

    done, failure = on_rank_zero(run.ctx, checks_and_callbacks)
    if failure is not None:
        raise NumericalError(f"alignment check at step {state.step} (phase {run.phase}): {failure}; "
                             "the run has diverged. Lower --lr or check the data.")
    row, state.q_t, state.alignment_checks = done
    state.rows.append(row)
    state.seconds["evaluation"] += time.perf_counter() - started
    return row


def _plain(value: Any) -> Any:
    """A numpy or one-element torch scalar as a Python number (checkpoints hold plain values)."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    return value


def _should_log(run: Run) -> bool:
    s, step = run.schedule, run.state.step
    every = run.config.track_alignment_every
    return (step % s.log_every == 0 or step == s.total or step == s.tau
            or bool(every and step % every == 0))


def _block_end(run: Run, last: int) -> int:
    """The first step after ``run.step`` at which the loop acts — logs (:func:`_should_log`),
    checkpoints, or stops at ``last``: a block of coefficient-space steps ends there."""
    step = run.state.step
    periods = (run.schedule.log_every, run.config.checkpoint_every, run.config.track_alignment_every)
    return min([last] + [(step // p + 1) * p for p in periods if p])


def _check_finite(run: Run, loss: float, phase: int, out: Path | None) -> None:
    if math.isfinite(loss):
        return
    raise NumericalError(f"training loss became {loss} at step {run.state.step} (phase {phase}); "
                         f"{last_good(run, out)}. Lower --lr or check the data.")


def _progress_bar(run: Run, progress: bool):
    if not progress or not run.ctx.is_main:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=run.schedule.total, initial=run.state.step, unit="step",
                desc=f"{run.config.method} {run.config.model} on {run.dataset.name}", leave=False)


# -- results -----------------------------------------------------------------------------------
def make_summary(run: Run) -> dict[str, Any]:
    """``summary.json``: the last logged figures, ``Q_T``, steps, times, config and certificate."""
    state = run.state
    last = state.rows[-1] if state.rows else evaluate(run)
    tracked = bool(run.config.track_alignment_every)
    return {"train_loss": last["loss"], "train_error": last["train_error"],
            "test_error": last["test_error"], "q_t": state.q_t if tracked else None,
            "alignment_checks": state.alignment_checks if tracked else None,
            "steps": state.step, "completed": state.step >= run.schedule.total,
            "switch_step": run.schedule.tau, "seconds": dict(state.seconds),
            "n": run.dataset.n, "data_note": run.dataset.note, "world_size": run.ctx.world,
            "config": run.config.to_dict(), "certificate": state.certificate}


def write_outputs(run: Run, out: Path, summary: dict[str, Any]) -> None:
    write_metrics(out / "metrics.csv", run.state.rows)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    plot_run(out, run.state.rows, run.schedule.tau,
             f"{run.config.method} · {run.config.model} · {run.dataset.name} (n={run.dataset.n})",
             certificate=run.state.certificate)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
