"""Metrics rows, ``metrics.csv`` and the PNG plots of a training run."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

BASE_COLUMNS = ["step", "epoch", "phase", "loss", "train_error", "test_error", "alignment_ok", "q_t"]


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text with the columns of ``metrics.csv`` (docs/design.md) first, then any extra columns
    callbacks added."""
    extra = sorted({k for row in rows for k in row} - set(BASE_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=BASE_COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in BASE_COLUMNS + extra})
    return buffer.getvalue()


def write_metrics(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, metrics_csv(rows))


def plot_run(out: Path, rows: list[dict[str, Any]], switch_step: int | None, title: str,
             certificate: dict[str, Any] | None = None) -> list[str]:
    """``training.png``: training loss and error over steps (switch marked); ``q_t.png`` when
    alignment was tracked; ``certificate.png`` when the switch's certificate carries the spectrum
    it decided (:func:`~global_convergence.conditions.plot.plot_spectrum`: how far from the
    tolerance its verdict stands). Returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("loss", "training loss", True)]
    if any(r.get("train_error") is not None for r in rows):
        panels.append(("train_error", "training error", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):
        ax.plot(steps, [r.get(key) for r in rows], lw=1.5)
        if log:
            ax.set_yscale("log")
        if switch_step is not None:
            ax.axvline(switch_step, color="gray", ls="--", lw=1, label="switch (τ)")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    written = ["training.png"]
    tracked = [r for r in rows if r.get("q_t") is not None]
    if tracked:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.step([r["step"] for r in tracked], [r["q_t"] for r in tracked], where="post")
        ax.set_xlabel("step")
        ax.set_ylabel("Q_T (checks violating alignment)")
        fig.tight_layout()
        fig.savefig(out / "q_t.png", dpi=110)
        plt.close(fig)
        written.append("q_t.png")
    condition = (certificate or {}).get("condition") or {}
    if (condition.get("spectrum") or {}).get("values"):
        from ..conditions.plot import plot_spectrum
        plot_spectrum(condition, out / "certificate.png")
        written.append("certificate.png")
    return written
