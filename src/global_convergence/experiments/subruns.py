"""The sub-runs of the paper reproductions (``gconv reproduce``, docs/reproduction.md).

Every experiment module builds :class:`Job` s — one :class:`~global_convergence.training.TrainConfig`
each — and hands them to :func:`run_jobs`, which trains them one after another with the library's
own :func:`~global_convergence.training.train`, each into its own folder under ``OUT/runs/`` —
or, with ``workers > 1``, side by side in that many worker processes (as ``gconv demo`` does).
A sub-run whose ``summary.json`` says ``completed: true`` for the same configuration is reused, not
redone; an interrupted one continues from its checkpoint.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..training import CHECKPOINT_NAME, LogEvent, TrainConfig, atomic_write_text, load_checkpoint, train
from ..training.state import result_options


RUNS_DIR = "runs"
"""Sub-runs live in ``OUT/runs/<key>/``."""


SUMMARY = "summary.json"


METRICS = "metrics.csv"


@dataclass(frozen=True)
class Context:
    """Where and how one experiment runs."""

    experiment: str
    preset: str
    out: Path
    data_root: str | None = None
    device: str = "cpu"
    progress: bool = True

    def say(self, message: str) -> None:
        """One progress line (suppressed by ``--quiet``)."""
        if self.progress:
            print(f"[{self.experiment}/{self.preset}] {message}", flush=True)

    def within(self, folder: str) -> "Context":
        """The same context writing under ``out/folder`` (for experiments built on others)."""
        return replace(self, out=self.out / folder)


CallbackFactory = Callable[[Path], list[Callable[[LogEvent], None]]]
"""Builds a sub-run's callbacks given its folder (e.g. an NTK tracker that stores M(θ_0) there)."""


@dataclass
class Job:
    """One training run of an experiment: a key (its folder name), its config, extra callbacks."""

    key: str
    config: TrainConfig
    callbacks: CallbackFactory | None = None
    label: dict[str, Any] = field(default_factory=dict)
    """What the experiment needs to know about the run (dataset, method, seed, …)."""
    cost: float = 1.0
    """Relative training cost: :func:`run_jobs` with workers starts the costliest first."""


@dataclass
class SubRun:
    """A finished (or reused) sub-run: its summary, its logged rows and whether it was reused."""

    job: Job
    folder: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    reused: bool

    @property
    def label(self) -> dict[str, Any]:
        return self.job.label

    def column(self, key: str) -> tuple[list[float], list[float]]:
        """Steps and values of a logged column, skipping rows where it is missing."""
        pairs = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @property
    def seconds(self) -> float:
        """Wall-clock of the training itself: both phases and the switch (no evaluation)."""
        s = self.summary.get("seconds") or {}
        return float(s.get("phase1", 0.0) + s.get("phase2", 0.0) + s.get("switch", 0.0))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The options that alter a run's numbers; options a saved config lacks (it predates them)
    take their defaults, which reproduce the behaviour from before they existed."""
    return result_options(TrainConfig.from_dict(config))


def completed_summary(folder: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a completed sub-run of ``config`` in ``folder``, or None."""
    path = folder / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = _comparable(summary.get("config", {})) == _comparable(config.to_dict())
    return summary if summary.get("completed") and same else None


def _resumable(folder: Path, config: TrainConfig) -> bool:
    """Whether ``folder`` holds a checkpoint of the same configuration to continue from."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return False
    try:
        saved = load_checkpoint(path)["config"]
    except Exception:                                     # unreadable: start over
        return False
    return _comparable(TrainConfig.from_dict(saved).to_dict()) == _comparable(config.to_dict())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv`` with numbers parsed ('' → None)."""
    with path.open(newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def run_job(ctx: Context, job: Job, position: str = "", *, bar: bool = True) -> SubRun:
    """Train ``job`` into ``OUT/runs/<key>``, or reuse it when it already completed. ``bar``:
    show the training's progress bar (when ``ctx.progress``)."""
    folder = ctx.out / RUNS_DIR / job.key
    summary = completed_summary(folder, job.config)
    if summary is not None:
        ctx.say(f"{position}{job.key}: reused (completed earlier)")
        return SubRun(job, folder, summary, read_metrics(folder / METRICS), reused=True)
    resume = _resumable(folder, job.config)
    if not resume and folder.exists():
        shutil.rmtree(folder)
    ctx.say(f"{position}{job.key}: " + ("resuming from its checkpoint" if resume else "training"))
    started = time.perf_counter()
    callbacks = job.callbacks(folder) if job.callbacks else []
    folder.mkdir(parents=True, exist_ok=True)
    summary = train(job.config, folder, resume=resume, progress=ctx.progress and bar,
                    callbacks=callbacks)
    ctx.say(f"{position}{job.key}: done in {time.perf_counter() - started:.0f} s"
            + _outcome(summary))
    return SubRun(job, folder, summary, read_metrics(folder / METRICS), reused=False)


def _outcome(summary: dict[str, Any]) -> str:
    parts = []
    for key, name in (("train_error", "train error"), ("test_error", "test error")):
        if summary.get(key) is not None:
            parts.append(f"{name} {100 * summary[key]:.2f} %")
    if summary.get("q_t") is not None:
        parts.append(f"Q_T {summary['q_t']}/{summary['alignment_checks']}")
    return (" (" + ", ".join(parts) + ")") if parts else ""


def run_jobs(ctx: Context, jobs: Sequence[Job], known: Sequence[SubRun] = (), *,
             workers: int = 1, threads: int | None = None) -> dict[str, SubRun]:
    """Run every job, showing ``[k/N]`` progress. A job is reused, not trained, when it
    completed earlier in its folder or when one of the ``known`` sub-runs has the same config.

    ``threads``: intra-op threads of every training (restored afterwards; None keeps the
    current setting). ``workers > 1`` trains that many jobs at once in worker processes
    (``spawn``), each on ``threads or 1`` threads, most costly first (:attr:`Job.cost`); a run's
    numbers then depend on its thread count only, not on ``workers``. Their callback factories
    must be picklable (e.g. :class:`~.ntk_tracking.NtkCallbacks`).
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate sub-run keys in {ctx.experiment}: {keys}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    done: dict[str, SubRun] = {}
    todo: list[tuple[str, Job]] = []
    for i, job in enumerate(jobs, 1):
        position = f"[{i}/{len(jobs)}] "
        twin = next((k for k in known if _comparable(k.job.config.to_dict())
                     == _comparable(job.config.to_dict())), None)
        if twin is not None:
            ctx.say(f"{position}{job.key}: same run as {twin.job.key}, reused")
            done[job.key] = SubRun(job, twin.folder, twin.summary, twin.rows, reused=True)
        else:
            todo.append((position, job))
    if workers > 1 and len(todo) > 1:
        done.update(_in_workers(ctx, todo, workers, threads or 1))
    else:
        for position, job in todo:
            done[job.key] = _run_with_threads(ctx, job, position, threads, bar=True)
    return {key: done[key] for key in keys}


def _run_with_threads(ctx: Context, job: Job, position: str, threads: int | None, *,
                      bar: bool) -> SubRun:
    """:func:`run_job` with ``threads`` intra-op threads (None: as they are)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run_job(ctx, job, position, bar=bar)
    finally:
        torch.set_num_threads(previous)


def _worker(task: tuple[Context, Job, str, int]) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """One job in a worker process: its summary, rows and whether it was reused."""
    ctx, job, position, threads = task
    run = _run_with_threads(ctx, job, position, threads, bar=False)
    return run.summary, run.rows, run.reused


def _in_workers(ctx: Context, todo: list[tuple[str, Job]], workers: int,
                threads: int) -> dict[str, SubRun]:
    """The jobs of ``todo`` in ``workers`` spawned processes, the most costly submitted first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    order = sorted(todo, key=lambda t: -t[1].cost)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                             initializer=keep_freed_memory) as pool:
        futures = {job.key: pool.submit(_worker, (ctx, job, position, threads))
                   for position, job in order}
        out = {}
        for position, job in order:
            summary, rows, reused = futures[job.key].result()
            out[job.key] = SubRun(job, ctx.out / RUNS_DIR / job.key, summary, rows, reused)
    return out


def cached_result(ctx: Context, key: str, compute: Callable[[], dict[str, Any]], *,
                  of_run: TrainConfig | None = None) -> dict[str, Any]:
    """A JSON result (e.g. a condition's verdict) computed once into ``OUT/runs/<key>/result.json``
    and reused afterwards (the same resumability as training sub-runs). ``of_run``: the
    configuration of the sub-run the result is computed from; a result saved for another one
    (its options that alter numbers differ) is computed again."""
    path = ctx.out / RUNS_DIR / key / "result.json"
    run = None if of_run is None else result_options(of_run)
    if path.is_file():
        saved = json.loads(path.read_text())
        same = run is None or ("of_run" in saved and _comparable(saved["of_run"]) == run)
        if saved.get("completed") and same:
            ctx.say(f"{key}: reused (completed earlier)")
            return saved
    ctx.say(f"{key}: computing")
    started = time.perf_counter()
    result = {**compute(), "completed": True, "wall_seconds": time.perf_counter() - started}
    if of_run is not None:
        result["of_run"] = of_run.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=json_default))
    ctx.say(f"{key}: done in {result['wall_seconds']:.0f} s")
    return result


def base_config(ctx: Context, **options: Any) -> TrainConfig:
    """A :class:`TrainConfig` with the context's device and data root."""
    return TrainConfig(device=ctx.device, data_root=ctx.data_root, **options)


def total_steps(config: TrainConfig, n: int) -> int:
    """Steps of a run of ``config`` on ``n`` training points (as the training loop counts them)."""
    from ..training import make_schedule

    return make_schedule(config, n).total


def json_default(value: Any) -> Any:
    """JSON for what ``json.dumps`` cannot write: dataclasses, tensors, numpy scalars, paths;
    non-finite floats become null."""
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
