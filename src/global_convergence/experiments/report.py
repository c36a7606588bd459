"""Reports of the reproductions: ``report.md`` with the papers' numbers beside ours, the tables and
number formats in it, and ``results.json`` with the raw numbers.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ..training import atomic_write_text
from .standins import display, paper_row
from .subruns import Context, SubRun, json_default


CHOICES = {
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
"""Choices the papers leave open, quoted in the reports whose figures depend on them
(docs/reproduction.md)."""


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
        """The choices the papers leave open that this experiment's figures depend on."""
        return self.section("Choices where the papers are silent",
                            "\n".join(f"- {CHOICES[k]}" for k in keys))

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
    atomic_write_text(path, json.dumps(results, indent=2, default=json_default))
    return path


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


def as_dict(settings: Any) -> dict[str, Any]:
    """A preset dataclass (nested ones included) as a plain dict, for ``results.json``."""
    return asdict(settings)


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
