"""Shared machinery of the paper reproductions (``gconv reproduce``, SPEC §5).

Every experiment module builds :class:`Job` s — one :class:`~global_convergence.training.TrainConfig`
each — and hands them to :func:`run_jobs`, which trains them one after another with the library's
own :func:`~global_convergence.training.train`, each into its own folder under ``OUT/runs/``.
A sub-run whose ``summary.json`` says ``completed: true`` for the same configuration is reused, not
redone; an interrupted one continues from its checkpoint. Conditions are checked with
:mod:`global_convergence.conditions`, NTKs computed with :mod:`global_convergence.ntk`.

Reports (``report.md``), raw results (``results.json``) and figures are written with
:class:`Report`, :func:`write_results` and :func:`plot_panels`.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import load_dataset, resolve_data_root
from ..data.vision import VISION
from ..errors import UserInputError
from ..models import SplitNet
from ..training import CHECKPOINT_NAME, LogEvent, TrainConfig, atomic_write_text, load_checkpoint, train
from ..training.loop import result_options

RUNS_DIR = "runs"
"""Sub-runs live in ``OUT/runs/<key>/``."""
SUMMARY = "summary.json"
METRICS = "metrics.csv"

SPEC_CHOICES = {
    "mlp": "`mlp` = 3 hidden layers of 300 softplus units + output ('four layers with 300 "
           "neurons per hidden layer')",
    "two-moons": "two moons: n = 100, `make_moons(noise=None)` (n is stated only for the sine wave)",
    "semeion-split": "Semeion: 1000 train / 593 test with a fixed seed (Table 2 uses n = 1000)",
    "gates": "gate sharpness ς' = 1 (the ResNet runs state σ̃(q) = 1/(1+e^{−q}))",
    "noise": "ε and δ0 are standard deviations of Gaussian noise ('N(0, ε²)')",
    "ee-mlp": "EE head width for the `mlp`: keeps its 300 units (the base already ends in two "
              "FC layers)",
    "bn": "batch norm in phase 2: fixed statistics recomputed over the training set at the switch",
    "resnet": "`resnet18` for [K22], `preact-resnet18` for [KS21] (CIFAR variant, softplus)",
    "softplus": "softplus ς = 100 everywhere; float32 subnormals flushed to zero on the CPU",
}
"""SPEC §3.4 (and §2) choices, quoted in the reports whose figures depend on them."""


# -- context and sub-runs ---------------------------------------------------------------------
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


def run_job(ctx: Context, job: Job, position: str = "") -> SubRun:
    """Train ``job`` into ``OUT/runs/<key>``, or reuse it when it already completed."""
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
    summary = train(job.config, folder, resume=resume, progress=ctx.progress, callbacks=callbacks)
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


def run_jobs(ctx: Context, jobs: Sequence[Job], known: Sequence[SubRun] = ()) -> dict[str, SubRun]:
    """Run every job in order, showing ``[k/N]`` progress. A job is reused, not trained, when it
    completed earlier in its folder or when one of the ``known`` sub-runs has the same config."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate sub-run keys in {ctx.experiment}: {keys}")
    done = {}
    for i, job in enumerate(jobs, 1):
        position = f"[{i}/{len(jobs)}] "
        twin = next((k for k in known if _comparable(k.job.config.to_dict())
                     == _comparable(job.config.to_dict())), None)
        if twin is not None:
            ctx.say(f"{position}{job.key}: same run as {twin.job.key}, reused")
            done[job.key] = SubRun(job, twin.folder, twin.summary, twin.rows, reused=True)
        else:
            done[job.key] = run_job(ctx, job, position)
    return done


def cached_result(ctx: Context, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A JSON result (e.g. a condition's verdict) computed once into ``OUT/runs/<key>/result.json``
    and reused afterwards (the same resumability as training sub-runs)."""
    path = ctx.out / RUNS_DIR / key / "result.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("completed"):
            ctx.say(f"{key}: reused (completed earlier)")
            return saved
    ctx.say(f"{key}: computing")
    started = time.perf_counter()
    result = {**compute(), "completed": True, "wall_seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=_json_default))
    ctx.say(f"{key}: done in {result['wall_seconds']:.0f} s")
    return result


def base_config(ctx: Context, **options: Any) -> TrainConfig:
    """A :class:`TrainConfig` with the context's device and data root."""
    return TrainConfig(device=ctx.device, data_root=ctx.data_root, **options)


# -- data ------------------------------------------------------------------------------------
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
        return "generated (SPEC §6)"
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


# -- NTK -------------------------------------------------------------------------------------
def full_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``M(θ) = J Jᵀ`` with respect to **all** parameters of ``model`` ([K22] Table 1, Fig. 3).

    Computed on a copy in eval mode (batch norm with running statistics, the function used for
    predictions); a frozen trunk is unfrozen on the copy and gate buffers stay as they are, so after
    the EE switch θ = (trunk, θ(H−1), W(H)) with the gates R fixed.
    """
    from ..ntk import empirical_ntk

    work = copy.deepcopy(model)
    if isinstance(work, SplitNet) and work.is_trunk_frozen:
        work.unfreeze_trunk()
    for p in work.parameters():
        p.requires_grad_(True)
    work.eval()
    device = next(work.parameters()).device
    return empirical_ntk(work, x.to(device))


class NtkTracker:
    """Callback adding ``ntk_change = ‖M(θ_t) − M(θ_0)‖_F²`` to the logged rows every ``every``
    steps and at the last step ([K22] Table 1 and Fig. 3). ``M(θ_0)`` is stored in the sub-run's
    folder so a resumed run keeps its reference.
    """

    def __init__(self, folder: Path, total_steps: int, every: int | None = None) -> None:
        self.path, self.total, self.every = folder / "ntk0.pt", total_steps, every
        self.m0: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return step == 0 or step == self.total or bool(self.every and step % self.every == 0)

    def __call__(self, event: LogEvent) -> None:
        from ..ntk import representation_change

        if not self.due(event.step):
            return
        m = full_ntk(event.model, event.dataset.x_train).cpu()
        if event.step == 0:
            self.m0 = m
            torch.save(m, self.path)
        elif self.m0 is None:
            self.m0 = torch.load(self.path, weights_only=True)
        event.row["ntk_change"] = representation_change(m, self.m0)


def ntk_callbacks(total_steps: int, every: int | None = None) -> CallbackFactory:
    """A :data:`CallbackFactory` with one :class:`NtkTracker`."""
    return lambda folder: [NtkTracker(folder, total_steps, every)]


def total_steps(config: TrainConfig, n: int) -> int:
    """Steps of a run of ``config`` on ``n`` training points (as the training loop counts them)."""
    from ..training import make_schedule

    return make_schedule(config, n).total


# -- statistics and formatting ---------------------------------------------------------------
def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def fmt_mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """``"7.80 (0.50)"`` like the papers' tables (std in parentheses, over the values given)."""
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ({scale * std:.{digits}f})" if std is not None else "")


def fmt_sci(value: float | None) -> str:
    """``2.09e+11`` style, ``—`` for missing values."""
    return "—" if value is None else f"{value:.2e}"


def fmt_pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (a sentence saying so when there are no rows)."""
    rows = list(rows)
    if not rows:
        return "*Not run in this preset.*"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- reports and results ---------------------------------------------------------------------
class Report:
    """``report.md``: title, settings, data, tables with the paper's numbers beside ours, figures."""

    def __init__(self, ctx: Context, title: str, source: str, settings: Any) -> None:
        self.ctx, self.parts = ctx, [f"# {title}", ""]
        command = f"gconv reproduce {ctx.experiment} --preset {ctx.preset} --out {ctx.out}"
        command += f" --data-root {ctx.data_root}" if ctx.data_root else ""
        command += f" --device {ctx.device}" if ctx.device != "cpu" else ""
        self.parts += [f"Source: {source}. Experiment `{ctx.experiment}`, preset `{ctx.preset}`, "
                       f"device `{ctx.device}`.", "", f"Reproduce: `{command}` (completed sub-runs "
                       "in that folder are reused).", ""]
        if settings is not None:
            self.section("Settings", settings_table(settings))

    def section(self, heading: str, *blocks: str) -> "Report":
        self.parts += [f"## {heading}", ""]
        for block in blocks:
            self.parts += [block, ""]
        return self

    def text(self, *blocks: str) -> "Report":
        for block in blocks:
            self.parts += [block, ""]
        return self

    def figure(self, file: str, caption: str) -> "Report":
        self.parts += [f"![{caption}]({file})", "", f"*{caption}*", ""]
        return self

    def choices(self, *keys: str) -> "Report":
        """The SPEC §3.4 choices this experiment's figures depend on."""
        return self.section("Choices where the papers are silent (SPEC §3.4)",
                            "\n".join(f"- {SPEC_CHOICES[k]}" for k in keys))

    def runs(self, subruns: Iterable[SubRun]) -> "Report":
        """A line on which sub-runs were reused, and where every sub-run's files are."""
        subruns = list(subruns)
        reused = sum(r.reused for r in subruns)
        where = dict.fromkeys(_relative(r.folder.parent, self.ctx.out) for r in subruns)
        return self.section("Sub-runs", f"{len(subruns)} training runs under "
                            + ", ".join(f"`{w}/`" for w in where)
                            + f" ({reused} reused from an earlier invocation or another sub-run); "
                            "each folder holds `summary.json` (with the certificate), "
                            "`metrics.csv` and plots.")

    def write(self) -> Path:
        path = self.ctx.out / "report.md"
        atomic_write_text(path, "\n".join(self.parts).rstrip() + "\n")
        return path


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def settings_table(settings: Any) -> str:
    """The preset dataclass as a two-column table."""
    values = asdict(settings) if is_dataclass(settings) else dict(settings)
    return md_table(["setting", "value"], [(f"`{k}`", f"`{v}`") for k, v in values.items()])


def write_results(ctx: Context, results: dict[str, Any]) -> Path:
    """``results.json``: the raw numbers of the report (plus experiment, preset, settings)."""
    path = ctx.out / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
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


def run_record(run: SubRun, *extra: str) -> dict[str, Any]:
    """The raw numbers of one sub-run for ``results.json``."""
    s = run.summary
    record = {"key": run.job.key, **run.label, "train_loss": s.get("train_loss"),
              "train_error": s.get("train_error"), "test_error": s.get("test_error"),
              "q_t": s.get("q_t"), "alignment_checks": s.get("alignment_checks"),
              "steps": s.get("steps"), "switch_step": s.get("switch_step"),
              "seconds": run.seconds, "reused": run.reused, "data_note": s.get("data_note")}
    certificate = s.get("certificate")
    if certificate:
        record["certificate_verdict"] = (certificate.get("condition") or {}).get("verdict")
    for key in extra:
        record[key] = last_value(run, key)
    return record


def last_value(run: SubRun, key: str) -> Any:
    """The last logged value of a column (e.g. ``ntk_change`` at T)."""
    values = [r[key] for r in run.rows if r.get(key) is not None]
    return values[-1] if values else None


# -- figures ---------------------------------------------------------------------------------
@dataclass
class Series:
    """One line of a panel; ``band`` (same length as ``y``) draws ± a standard deviation."""

    label: str | None
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    style: str = "-"
    band: Sequence[float] | None = None
    step: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    logy: bool = False
    vline: float | None = None
    vline_label: str = "τ (switch)"


def plot_panels(path: Path, panels: Sequence[Panel], title: str | None = None,
                columns: int | None = None) -> str:
    """Draw ``panels`` side by side (wrapping after ``columns``) into ``path``; returns its name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _draw_panel(ax, panel: Panel) -> None:
    for s in panel.series:
        if not len(s.x):
            continue
        draw = ax.step if s.step else ax.plot
        kwargs = {"where": "post"} if s.step else {}
        draw(s.x, s.y, s.style, color=s.color, label=s.label, lw=1.4, **kwargs)
        if s.band is not None:
            y, b = np.asarray(s.y, float), np.asarray(s.band, float)
            ax.fill_between(s.x, y - b, y + b, color=s.color, alpha=0.2, lw=0)
    if panel.logy:
        ax.set_yscale("log")
    if panel.vline is not None:
        ax.axvline(panel.vline, color="gray", ls="--", lw=1, label=panel.vline_label)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if any(s.label for s in panel.series) or panel.vline is not None:
        ax.legend(fontsize=7)


def mean_curve(runs: Sequence[SubRun], key: str,
               x: str = "step") -> tuple[list[float], list[float], list[float]]:
    """``x`` values (steps or epochs), mean and standard deviation of a column over runs logged
    at the same points."""
    columns = [{r[x]: r[key] for r in run.rows if r.get(key) is not None} for run in runs]
    steps = sorted(set.intersection(*(set(c) for c in columns))) if columns else []
    means, stds = [], []
    for step in steps:
        m, s = mean_std([c[step] for c in columns])
        means.append(m)
        stds.append(s or 0.0)
    return steps, means, stds


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def as_dict(settings: Any) -> dict[str, Any]:
    """A preset dataclass (nested ones included) as a plain dict, for ``results.json``."""
    return asdict(settings)


# -- image-classification experiments ([K22] §3.4.2, [KS21] §7) -------------------------------
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


@dataclass(frozen=True)
class SGDRecipe:
    """The papers' SGD setting for the ResNets (batch 64, momentum 0.9, weight decay 1e-5), and
    how often a run is evaluated (every epoch in the papers; less often saves time on a CPU)."""

    lr: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-5
    log_epochs: int = 1


def image_config(ctx: Context, recipe: SGDRecipe, *, data: str, model: str, method: str,
                 seed: int, augment: bool, epochs: int, n: int | None = None,
                 **options: Any) -> TrainConfig:
    """A ResNet run of the papers' SGD recipe on data set ``data``, evaluated (one log row) every
    ``recipe.log_epochs`` epochs, at the switch and at the end."""
    config = base_config(ctx, data=data_arg(ctx, data), model=model, method=method, seed=seed,
                         augment=augment, epochs=epochs, n=n, optimizer="sgd", lr=recipe.lr,
                         batch_size=recipe.batch_size, momentum=recipe.momentum,
                         weight_decay=recipe.weight_decay, **options)
    if recipe.log_epochs > 1:
        config.log_every = recipe.log_epochs * epoch_steps(config)
    return config


def epoch_steps(config: TrainConfig) -> int:
    """Steps per epoch of a run of ``config`` (its training set after any ``holdout``)."""
    from ..training import make_schedule

    n = len(training_inputs(config))
    if config.holdout is not None:
        n -= max(1, round(config.holdout * n))
    return make_schedule(config, n).steps_per_epoch


def group(runs: Iterable[SubRun], *keys: str) -> dict[tuple, list[SubRun]]:
    """Runs grouped by the values of some of their labels, in first-seen order."""
    out: dict[tuple, list[SubRun]] = {}
    for r in runs:
        out.setdefault(tuple(r.label[k] for k in keys), []).append(r)
    return out


def test_errors(runs: Iterable[SubRun]) -> list[float | None]:
    return [r.summary.get("test_error") for r in runs]


def paper_pair(values: tuple[float, float] | None) -> str:
    """A paper's ``mean (std)`` pair as printed."""
    return "—" if values is None else f"{values[0]:.2f} ({values[1]:.2f})"


def loss_curve_panels(runs: Sequence[SubRun], methods: Sequence[str], datasets: Sequence[str],
                      augment: bool) -> list[Panel]:
    """One panel per data set: mean ± std training loss over epochs for each method (the runs
    labelled ``dataset``, ``augment`` and ``method``), the switch epoch marked."""
    panels = []
    for data in datasets:
        series, switch = [], None
        for i, method in enumerate(methods):
            mine = [r for r in runs if r.label["dataset"] == data and r.label["method"] == method
                    and r.label["augment"] == augment]
            if not mine:
                continue
            epochs, mean, std = mean_curve(mine, "loss", x="epoch")
            series.append(Series(method, epochs, mean, COLORS[i % len(COLORS)], band=std))
            if mine[0].summary.get("switch_step") is not None:
                per_epoch = mine[0].summary["steps"] / max(1, mine[0].summary["config"]["epochs"])
                switch = mine[0].summary["switch_step"] / per_epoch
        if series:
            panels.append(Panel(f"{data}, {'with' if augment else 'no'} augmentation",
                                "epoch", "training loss", series, logy=True, vline=switch))
    return panels


def beside_paper(paper: dict[Any, Sequence[tuple[float, float] | None]],
                 ours: dict[Any, Sequence[str]],
                 to_paper: Callable[[Any], Any] = paper_row,
                 label: Callable[[Any], str] = display) -> list[list[str]]:
    """Rows of a table with the paper's ``mean (std)`` beside ours, cell by cell.

    ``paper``: the paper's rows (key → one pair per method); ``ours``: our formatted cells per
    measured key. Every paper row appears — with our numbers from the key ``to_paper`` maps to it
    (the data set itself or its stand-in, named in the row), or "not run" — then the keys we
    measured that the paper does not report.
    """
    rows, used = [], set()
    for key, cells in paper.items():
        mine = next((k for k in ours if to_paper(k) == key and k not in used), None)
        name = label(key) if mine is None or mine == key else f"{label(key)} — ours: {label(mine)}"
        values = ours[mine] if mine is not None else ["not run"] * len(cells)
        used.add(mine)
        rows.append([name] + [c for p, o in zip(cells, values) for c in (paper_pair(p), o)])
    for key, values in ours.items():
        if key not in used:
            rows.append([label(key)] + [c for o in values for c in ("—", o)])
    return rows
