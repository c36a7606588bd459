"""The decided spectrum of a rank verdict as a picture: how far from the tolerance it stands.

:func:`plot_spectrum` draws the values a verdict kept (``details["spectrum"]``: ``σ_1`` and the
smallest few hundred singular values, or the Gram certificate's certified lower bound of ``σ_n``
and its estimate), the tolerance, the inconclusive band ``[tol/band, tol·band]`` and the n-th
position, on a log scale (docs/verifiers.md "Show why"). It takes a
:class:`~global_convergence.linalg.Verdict`, its ``to_dict()`` (``gconv verify --json``), or the
``condition`` of a run's certificate; for several outputs the deciding output's values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import UserInputError  # noqa: E402
from ..linalg import RANK_BAND, Verdict  # noqa: E402


def plot_spectrum(verdict: Verdict | dict[str, Any], path: str | Path) -> Path:
    """Write the plot of ``verdict``'s decided spectrum to ``path`` (a .png); returns the path."""
    d = verdict.to_dict() if isinstance(verdict, Verdict) else dict(verdict)
    spectrum = d.get("spectrum")
    if not spectrum or not spectrum.get("values"):
        raise UserInputError(f"the {d.get('condition', 'rank')} verdict carries no spectrum to "
                             "plot (it was decided without singular values or a certificate)")
    tol, band, n = float(d["tolerance"]), float(d.get("band") or RANK_BAND), int(d["n"])
    index, values = spectrum["index"], [max(v, tiny(tol)) for v in spectrum["values"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    certified = "certified_lower_bound" in spectrum
    if certified:
        ax.scatter(index[:1], values[:1], color="C0", label="σ_max")
        ax.scatter(index[1:2], values[1:2], color="C2", marker="^", s=60,
                   label="certified lower bound of σ_n")
        ax.scatter(index[2:], values[2:], color="C1", marker="x", label="estimate of σ_n")
    else:
        ax.semilogy(index, values, ".", color="C0", ms=3, label=spectrum.get("kind", "values"))
        at_n = [v for i, v in zip(index, values) if i == n]
        if at_n:
            ax.scatter([n], at_n, color="C3", s=50, zorder=3, label=f"σ_{n} (decides)")
    ax.set_yscale("log")
    ax.axhline(tol, color="C3", lw=1, label=f"tolerance {tol:.2g}")
    ax.axhspan(tol / band, tol * band, color="C3", alpha=0.12, label="inconclusive band")
    ax.axvline(n, color="0.4", ls="--", lw=1, label=f"n = {n}")
    margin = d.get("margin")
    ax.set_title(f"{d.get('condition', 'rank')}: {d['verdict']}, rank {d['rank']} of {n}"
                 + (f", margin {margin:.3g}" if margin else ""), fontsize=10)
    ax.set_xlabel("index of the singular value (sorted, descending)")
    ax.set_ylabel("value")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tiny(tol: float) -> float:
    """Floor for values drawn on the log scale (zeros): far below the band."""
    return tol * 1e-12 if tol > 0 else 1e-300
