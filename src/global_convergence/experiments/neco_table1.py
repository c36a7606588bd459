"""[K22] Table 1: the change of the gradient representation ``‖M(θ_T) − M(θ_0)‖_F²``.

``M(θ) = J(θ) J(θ)ᵀ`` over all parameters, at the first and the last step of the runs of
Figure 1 — (a) the `mlp` on two moons and the sine wave, (b) LeNet m_c ∈ {1, 2, 4} on Semeion and
random data, two seeds. The runs are those of ``neco-fig1a`` and ``neco-fig1bc`` (their modules
build them), kept under ``OUT/fig1a`` and ``OUT/fig1bc``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from . import neco_fig1a, neco_fig1bc
from .report import (Report, as_dict, fmt_pct, fmt_sci, last_value, md_table, mean_std, run_record,
                     settings_table, write_results)
from .standins import data_note, paper_row
from .subruns import Context, SubRun

TITLE = "[K22] Table 1: change of the gradient representation ‖M(θ_T) − M(θ_0)‖_F²"
SOURCE = "Kawaguchi, Neural Computation 34(4) 2022, §2.2, Table 1"

PAPER_MLP = neco_fig1a.PAPER_NTK_CHANGE
PAPER_LENET = {  # (data set, m_c, seed#) -> value, [K22] Table 1b
    ("semeion", 4, 1): 8.09e12, ("semeion", 4, 2): 5.19e12, ("semeion", 2, 1): 9.82e12,
    ("semeion", 2, 2): 3.97e12, ("semeion", 1, 1): 2.97e12, ("semeion", 1, 2): 5.41e12,
    ("random", 4, 1): 3.73e12, ("random", 4, 2): 1.64e12, ("random", 2, 1): 3.43e7,
    ("random", 2, 2): 4.86e12, ("random", 1, 1): 1.40e7, ("random", 1, 2): 8.57e11,
}


@dataclass(frozen=True)
class Table1Settings:
    """The Figure 1 presets whose runs Table 1 measures (NTK tracking switched on)."""

    fig1a: neco_fig1a.Fig1aSettings
    fig1bc: neco_fig1bc.Fig1bcSettings


PRESETS = {name: Table1Settings(replace(neco_fig1a.PRESETS[name], ntk=True),
                                replace(neco_fig1bc.PRESETS[name], ntk=True))
           for name in ("smoke", "cpu", "paper")}


def _paper_key(run: SubRun, s: neco_fig1bc.Fig1bcSettings) -> tuple[str, int, int]:
    """The Table 1b cell a run stands for: our i-th seed is set beside the paper's seed #i+1
    (the paper's seeds are not given), Semeion's stand-in beside Semeion."""
    return (paper_row(run.label["dataset"]), run.label["width"],
            s.seeds.index(run.label["seed"]) + 1)


def lenet_rows(runs: list[SubRun], s: neco_fig1bc.Fig1bcSettings) -> list[list[str]]:
    """Table 1b: every cell of the paper, with our value where we ran it, then any other runs."""
    ours = {_paper_key(r, s): r for r in runs}
    rows = []
    for key in list(PAPER_LENET) + [k for k in ours if k not in PAPER_LENET]:
        run = ours.get(key)
        data = key[0] if run is None else run.label["dataset"]
        seed = None if run is None else run.label["seed"]
        rows.append([data, key[1], f"#{key[2]}" + ("" if run is None else f" (ours: seed {seed})"),
                     fmt_sci(PAPER_LENET.get(key)),
                     "not run" if run is None else fmt_sci(last_value(run, "ntk_change")),
                     "—" if run is None else fmt_pct(run.summary["train_error"], 1)])
    return rows


def mlp_rows(runs: list[SubRun]) -> list[list[str]]:
    """Table 1a: the paper's value beside our mean (std) over seeds."""
    rows = []
    for data in dict.fromkeys(r.label["dataset"] for r in runs):
        values = [last_value(r, "ntk_change") for r in runs if r.label["dataset"] == data]
        mean, std = mean_std(values)
        rows.append([data, fmt_sci(PAPER_MLP.get(data)),
                     fmt_sci(mean) + (f" ({fmt_sci(std)})" if std is not None else ""),
                     ", ".join(fmt_sci(v) for v in values)])
    return rows


def run(ctx: Context, s: Table1Settings) -> Path:
    """Run (or reuse) the Figure 1 runs and tabulate ‖ΔM‖² beside the paper's Table 1."""
    mlp_runs = neco_fig1a.collect(ctx.within("fig1a"), s.fig1a)
    lenet_runs = neco_fig1bc.collect(ctx.within("fig1bc"), s.fig1bc)
    report = Report(ctx, TITLE, SOURCE, None)
    report.section("Settings", "Figure 1a runs:", settings_table(s.fig1a),
                   "Figure 1b,c runs:", settings_table(s.fig1bc))
    report.section("Table 1a: fully connected network (mlp)",
                   md_table(["data set", "paper", "ours mean (std)", "ours per seed"],
                            mlp_rows(mlp_runs)))
    report.section("Table 1b: convolutional network (LeNet)",
                   md_table(["data set", "m_c", "seed", "paper", "ours", "ours: final train error (%)"],
                            lenet_rows(lenet_runs, s.fig1bc)),
                   "M = J Jᵀ over all parameters (float32 structured NTK of "
                   "`global_convergence.ntk`), at t = 0 and t = T. ‖ΔM‖² grows with n² and with "
                   "the size of the logits: runs with a smaller n than the paper's (cpu and smoke "
                   "presets) give proportionally smaller values. Data sets: "
                   + "; ".join(f"`{d}`: {data_note(d, ctx.data_root)}"
                               for d in s.fig1bc.datasets) + ".")
    report.runs(mlp_runs + lenet_runs)
    write_results(ctx, {"experiment": ctx.experiment, "preset": ctx.preset,
                        "settings": {"fig1a": as_dict(s.fig1a), "fig1bc": as_dict(s.fig1bc)},
                        "paper": {"mlp": PAPER_MLP,
                                  "lenet": [{"dataset": k[0], "width": k[1], "seed_index": k[2],
                                             "value": v} for k, v in PAPER_LENET.items()]},
                        "runs": [run_record(r, "ntk_change") for r in mlp_runs + lenet_runs]})
    return report.write()

