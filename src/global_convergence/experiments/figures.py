"""Figures of the reproductions: panels of curves (mean ± standard deviation over seeds), drawn with
matplotlib into PNG files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .report import mean_std
from .subruns import SubRun


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
