"""[K22] Tables 3–6, Figure 4 and the learning-rate study: ResNet-18, Standard vs A(Standard).

*Standard* is SGD (batch 64, momentum 0.9, weight decay 1e-5, lr 0.1) on ``resnet18``;
*A(Standard)* is its EE wrapper with G̃ = G (``method="ee"``). ε and τ0 are selected from
ε ∈ {1e-3, 1e-5} × τ0 ∈ {0.4, 0.6, 0.8} on an 80/20 split of the training set (``holdout=0.2``),
per data set and augmentation setting, then five trials run on the full training set:

- Table 3 (with augmentation, T = 200 epochs) and Table 4 (without, T = 100): test errors;
- Table 5: wall-clock seconds of the Table 3 runs on Semeion and CIFAR-10;
- Figure 4: training loss with augmentation, mean ± std over trials;
- Table 6: A(Standard) with G̃ = L-BFGS on MNIST over the (ε, τ0) grid, ± augmentation;
- the learning-rate study: MNIST with augmentation, best lr of {0.2, 0.1, 0.01, 0.001} per method;
- ``‖M(θ_T) − M(θ_0)‖_F²`` on Semeion (quoted in the text).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from .figures import loss_curve_panels, plot_panels
from .ntk_tracking import ntk_callbacks
from .recipes import SGDRecipe, image_config
from .report import (Report, as_dict, beside_paper, fmt_mean_std, fmt_sci, group, last_value,
                     md_table, mean_std, paper_pair, run_record, test_errors, write_results)
from .standins import SMALL_DIGITS, STAND_INS, data_note, display, require_datasets, training_inputs
from .subruns import Context, Job, SubRun, run_jobs, total_steps

TITLE = "[K22] Tables 3–6, Figure 4, lr study: ResNet-18, Standard vs A(Standard)"
SOURCE = "Kawaguchi, Neural Computation 34(4) 2022, §3.4.2, Tables 3–6, Figure 4"
STANDARD, EE = "Standard", "A(Standard)"

PAPER_TABLE3 = {  # with augmentation: (mean, std) test error %, Standard and A(Standard)
    "mnist": ((0.40, 0.05), (0.30, 0.05)), "cifar10": ((7.80, 0.50), (7.14, 0.12)),
    "cifar100": ((32.26, 0.15), (28.38, 0.42)), "semeion": ((2.59, 0.57), (2.56, 0.55)),
    "kmnist": ((1.48, 0.07), (1.36, 0.11)), "svhn": ((4.67, 0.05), (4.43, 0.11)),
}
PAPER_TABLE4 = {  # without augmentation (our text copy has these three rows)
    "mnist": ((0.52, 0.16), (0.49, 0.02)), "cifar10": ((15.15, 0.87), (14.56, 0.38)),
    "cifar100": ((54.99, 2.29), (46.13, 1.80)),
}
PAPER_TABLE5 = {  # wall-clock seconds on a local GPU workstation
    "semeion": ((364.60, 0.94), (356.82, 0.67)), "cifar10": ((3616.92, 10.57), (3604.5, 6.80)),
}
PAPER_TABLE6 = {  # MNIST, G̃ = L-BFGS: (augment, eps, tau0) -> test error %
    (True, 1e-3, 0.4): 0.26, (True, 1e-3, 0.6): 0.38, (True, 1e-3, 0.8): 0.37,
    (True, 1e-5, 0.4): 0.37, (True, 1e-5, 0.6): 0.32, (True, 1e-5, 0.8): 0.37,
    (False, 1e-3, 0.4): 0.36, (False, 1e-3, 0.6): 0.43, (False, 1e-3, 0.8): 0.42,
    (False, 1e-5, 0.4): 0.42, (False, 1e-5, 0.6): 0.35, (False, 1e-5, 0.8): 0.35,
}
PAPER_LR_STUDY = {STANDARD: (0.33, 0.03), EE: (0.27, 0.03)}
PAPER_NTK_SEMEION = {STANDARD: 4.64e12, EE: 3.43e12}


@dataclass(frozen=True)
class Table3to5Settings:
    """One preset. ``datasets_aug`` / ``datasets_plain``: data sets of Tables 3 / 4. With
    ``select`` ε and τ0 come from the 80/20 grid search (one seed), else ``eps``/``tau0``.
    ``lbfgs_dataset`` (Table 6), ``lr_dataset`` (lr study) and ``ntk_dataset`` (‖ΔM‖²) may be
    None to skip that part."""

    datasets_aug: tuple[str, ...] = ("mnist", "cifar10", "cifar100", "semeion", "kmnist", "svhn")
    datasets_plain: tuple[str, ...] = ("mnist", "cifar10", "cifar100")
    n: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs_aug: int = 200
    epochs_plain: int = 100
    recipe: SGDRecipe = SGDRecipe(lr=0.1)
    select: bool = True
    eps_grid: tuple[float, ...] = (1e-3, 1e-5)
    tau0_grid: tuple[float, ...] = (0.4, 0.6, 0.8)
    holdout: float = 0.2
    eps: float = 1e-3
    tau0: float = 0.6
    wallclock_datasets: tuple[str, ...] = ("semeion", "cifar10")
    wallclock_augment: bool = True
    lbfgs_dataset: str | None = "mnist"
    lbfgs_augment: tuple[bool, ...] = (True, False)
    lbfgs_seeds: tuple[int, ...] = (0,)
    lr_dataset: str | None = "mnist"
    lr_grid: tuple[float, ...] = (0.2, 0.1, 0.01, 0.001)
    lr_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lr_augment: bool = True
    ntk_dataset: str | None = "semeion"


PRESETS = {
    "smoke": Table3to5Settings(
        datasets_aug=(), datasets_plain=(SMALL_DIGITS,), seeds=(0,), epochs_aug=2,
        epochs_plain=2, eps_grid=(1e-3,), tau0_grid=(0.5,), wallclock_datasets=(SMALL_DIGITS,),
        wallclock_augment=False, lbfgs_dataset=SMALL_DIGITS, lbfgs_augment=(False,),
        lr_dataset=SMALL_DIGITS, lr_grid=(0.1,), lr_seeds=(0,), lr_augment=False,
        ntk_dataset=None),
    "cpu": Table3to5Settings(
        datasets_aug=("digits",), datasets_plain=("digits",), n=500, seeds=(0, 1),
        epochs_aug=20, epochs_plain=10, recipe=SGDRecipe(lr=0.1, log_epochs=2), select=False,
        eps_grid=(1e-3,), wallclock_datasets=("digits",), lbfgs_dataset="digits",
        lbfgs_augment=(False,), lr_dataset="digits", lr_grid=(0.1, 0.01), lr_seeds=(0,),
        lr_augment=False, ntk_dataset=None),
    "paper": Table3to5Settings(),
}


def _epochs(s: Table3to5Settings, augment: bool) -> int:
    return s.epochs_aug if augment else s.epochs_plain


def _settings_pairs(s: Table3to5Settings) -> list[tuple[str, bool]]:
    return [(d, True) for d in s.datasets_aug] + [(d, False) for d in s.datasets_plain]


def _aug(augment: bool) -> str:
    return "aug" if augment else "plain"


# -- selection of ε, τ0 on the 80/20 split ----------------------------------------------------
def selection_jobs(ctx: Context, s: Table3to5Settings) -> list[Job]:
    """A(Standard) on 80 % of the training set, validated on 20 %, for every (ε, τ0)."""
    if not s.select:
        return []
    jobs = []
    for data, augment in _settings_pairs(s):
        for eps, tau0 in itertools.product(s.eps_grid, s.tau0_grid):
            config = image_config(ctx, s.recipe, data=data, model="resnet18", method="ee",
                                  seed=s.seeds[0], augment=augment, epochs=_epochs(s, augment),
                                  n=s.n, eps=eps, tau0=tau0, holdout=s.holdout)
            jobs.append(Job(f"select-{data}-{_aug(augment)}-eps{eps:g}-tau{tau0:g}", config,
                            label={"dataset": data, "augment": augment, "eps": eps, "tau0": tau0}))
    return jobs


Choice = dict[tuple[str, bool], tuple[float, float]]
"""(data set, augmentation) → the selected (ε, τ0)."""


def selected(s: Table3to5Settings, runs: dict[str, SubRun]) -> Choice:
    """(ε, τ0) with the smallest validation error per (data set, augmentation); ties → first."""
    choice = {}
    for (data, augment), mine in group(runs.values(), "dataset", "augment").items():
        best = min(mine, key=lambda r: r.summary["test_error"])
        choice[(data, augment)] = (best.label["eps"], best.label["tau0"])
    for pair in _settings_pairs(s):
        choice.setdefault(pair, (s.eps, s.tau0))
    return choice


# -- main runs, L-BFGS grid, lr study -----------------------------------------------------------
def _ntk_setting(s: Table3to5Settings) -> tuple[str, bool] | None:
    """The main runs whose ‖M(θ_T) − M(θ_0)‖_F² is measured: ``ntk_dataset`` with augmentation
    (Table 3) when it has such runs, else without."""
    if s.ntk_dataset is None:
        return None
    return (s.ntk_dataset, s.ntk_dataset in s.datasets_aug)


def main_jobs(ctx: Context, s: Table3to5Settings, choice: Choice) -> list[Job]:
    """Tables 3, 4 (and 5, Fig. 4): both methods, every data set and seed."""
    jobs = []
    for data, augment in _settings_pairs(s):
        eps, tau0 = choice[(data, augment)]
        epochs = _epochs(s, augment)
        for method, seed in itertools.product((STANDARD, EE), s.seeds):
            config = image_config(ctx, s.recipe, data=data, model="resnet18",
                                  method="base" if method == STANDARD else "ee", seed=seed,
                                  augment=augment, epochs=epochs, n=s.n, eps=eps, tau0=tau0)
            callbacks = None
            if (data, augment) == _ntk_setting(s):
                callbacks = ntk_callbacks(total_steps(config, len(training_inputs(config))))
            slug = "standard" if method == STANDARD else "ee"
            jobs.append(Job(f"{data}-{_aug(augment)}-{slug}-s{seed}", config, callbacks,
                            {"dataset": data, "augment": augment, "method": method, "seed": seed}))
    return jobs


def lbfgs_jobs(ctx: Context, s: Table3to5Settings) -> list[Job]:
    """Table 6: A(Standard) with G̃ = L-BFGS over the (ε, τ0) grid."""
    if s.lbfgs_dataset is None:
        return []
    jobs = []
    for augment, eps, tau0, seed in itertools.product(s.lbfgs_augment, s.eps_grid, s.tau0_grid,
                                                      s.lbfgs_seeds):
        config = image_config(ctx, s.recipe, data=s.lbfgs_dataset, model="resnet18", method="ee",
                              seed=seed, augment=augment, epochs=_epochs(s, augment), n=s.n,
                              eps=eps, tau0=tau0, exploit_optimizer="lbfgs")
        jobs.append(Job(f"lbfgs-{s.lbfgs_dataset}-{_aug(augment)}-eps{eps:g}-tau{tau0:g}-s{seed}",
                        config, label={"augment": augment, "eps": eps, "tau0": tau0, "seed": seed}))
    return jobs


def lr_jobs(ctx: Context, s: Table3to5Settings, choice: Choice) -> list[Job]:
    """The lr study: both methods (G̃ = G) at every lr of the grid (runs identical to main runs
    are taken from there by :func:`run_jobs`)."""
    if s.lr_dataset is None:
        return []
    eps, tau0 = choice.get((s.lr_dataset, s.lr_augment), (s.eps, s.tau0))
    jobs = []
    for lr, method, seed in itertools.product(s.lr_grid, (STANDARD, EE), s.lr_seeds):
        config = image_config(ctx, replace(s.recipe, lr=lr), data=s.lr_dataset, model="resnet18",
                              method="base" if method == STANDARD else "ee", seed=seed,
                              augment=s.lr_augment, epochs=_epochs(s, s.lr_augment), n=s.n,
                              eps=eps, tau0=tau0)
        slug = "standard" if method == STANDARD else "ee"
        jobs.append(Job(f"lr{lr:g}-{s.lr_dataset}-{slug}-s{seed}", config,
                        label={"lr": lr, "method": method, "seed": seed}))
    return jobs


# -- tables -------------------------------------------------------------------------------------
def error_table(runs: list[SubRun], augment: bool, paper: dict) -> tuple[list[list[str]], dict]:
    """Table 3 or 4: test error (%) mean (std), paper beside ours, per data set and method."""
    raw = {}
    for (data, aug), mine in group(runs, "dataset", "augment").items():
        if aug == augment:
            by_method = group(mine, "method")
            raw[data] = {m: test_errors(by_method.get((m,), [])) for m in (STANDARD, EE)}
    ours = {d: [fmt_mean_std(v[m], 100) for m in (STANDARD, EE)] for d, v in raw.items()}
    return beside_paper(paper, ours), raw


def wallclock_table(runs: list[SubRun], s: Table3to5Settings) -> tuple[list[list[str]], dict]:
    """Table 5: training seconds (both phases and the switch) of the augmented main runs."""
    raw = {}
    for data in s.wallclock_datasets:
        mine = [r for r in runs if r.label["dataset"] == data
                and r.label["augment"] == s.wallclock_augment]
        if mine:
            by_method = group(mine, "method")
            raw[data] = {m: [r.seconds for r in by_method.get((m,), [])] for m in (STANDARD, EE)}
    ours = {d: [fmt_mean_std(v[m], 1, 1) for m in (STANDARD, EE)] for d, v in raw.items()}
    return beside_paper(PAPER_TABLE5, ours), raw


def lbfgs_table(runs: list[SubRun]) -> tuple[list[list[str]], dict]:
    """Table 6: test error (%) of A(Standard) with G̃ = L-BFGS per (augmentation, ε, τ0): every
    cell of the paper, ours where run, then cells only we ran."""
    ours = {key: test_errors(mine) for key, mine in group(runs, "augment", "eps", "tau0").items()}
    rows = []
    for key in list(PAPER_TABLE6) + [k for k in ours if k not in PAPER_TABLE6]:
        augment, eps, tau0 = key
        paper = PAPER_TABLE6.get(key)
        rows.append(["yes" if augment else "no", f"{eps:g}", f"{tau0:g}",
                     "—" if paper is None else f"{paper:.2f}",
                     fmt_mean_std(ours[key], 100) if key in ours else "not run"])
    return rows, {f"{_aug(a)}-eps{e:g}-tau{t:g}": v for (a, e, t), v in ours.items()}


def lr_table(runs: list[SubRun], s: Table3to5Settings) -> tuple[list[list[str]], dict]:
    """The lr study: every lr's mean test error, and the best lr per method beside the paper's."""
    rows, raw = [], {}
    for method in (STANDARD, EE):
        per_lr = {lr: test_errors(mine) for (lr, m), mine in group(runs, "lr", "method").items()
                  if m == method}
        if not per_lr:
            continue
        best = min(per_lr, key=lambda lr: mean_std(per_lr[lr])[0])
        paper = PAPER_LR_STUDY[method]
        rows.append([method, paper_pair(paper), f"{best:g}", fmt_mean_std(per_lr[best], 100),
                     "; ".join(f"{lr:g}: {fmt_mean_std(v, 100)}" for lr, v in per_lr.items())])
        raw[method] = {"best_lr": best, "test_errors": {str(k): v for k, v in per_lr.items()}}
    return rows, raw


def ntk_rows(runs: list[SubRun], s: Table3to5Settings) -> list[list[str]]:
    """‖M(θ_T) − M(θ_0)‖_F² of both methods (mean over seeds) beside the paper's Semeion values."""
    by_method = group([r for r in runs if (r.label["dataset"], r.label["augment"])
                       == _ntk_setting(s)], "method")
    rows = []
    for method, paper in PAPER_NTK_SEMEION.items():
        values = [last_value(r, "ntk_change") for r in by_method.get((method,), [])]
        ours = fmt_sci(mean_std(values)[0]) if values else "not measured in this preset"
        rows.append([method, fmt_sci(paper), ours])
    return rows


# -- the experiment -------------------------------------------------------------------------------
def run(ctx: Context, s: Table3to5Settings) -> Path:
    """Select ε, τ0, run both methods, the L-BFGS grid and the lr study; write the report."""
    names = set(s.datasets_aug) | set(s.datasets_plain) | {s.lbfgs_dataset, s.lr_dataset} - {None}
    require_datasets(ctx, sorted(names))
    selection = run_jobs(ctx.within("selection"), selection_jobs(ctx, s))
    choice = selected(s, selection)
    main = list(run_jobs(ctx, main_jobs(ctx, s, choice)).values())
    lbfgs = list(run_jobs(ctx.within("lbfgs"), lbfgs_jobs(ctx, s)).values())
    lr_runs = list(run_jobs(ctx.within("lr-study"), lr_jobs(ctx, s, choice), known=main).values())

    t3, raw3 = error_table(main, True, PAPER_TABLE3)
    t4, raw4 = error_table(main, False, PAPER_TABLE4)
    t5, raw5 = wallclock_table(main, s)
    t6, raw6 = lbfgs_table(lbfgs)
    tl, rawl = lr_table(lr_runs, s)
    header = ["data set", "paper: Standard", "ours: Standard", f"paper: {EE}", f"ours: {EE}"]

    report = Report(ctx, TITLE, SOURCE, s)
    report.section("Data", "\n".join(f"- `{d}`: {data_note(d, ctx.data_root)}" for d in sorted(names))
                   + ("\n\nStand-ins are set beside the paper's row of the data set they replace "
                      "(digits → Semeion); their numbers are not expected to match." if
                      any(d in STAND_INS for d in names) else ""))
    report.section("Selection of ε and τ0", _selection_text(s, selection, choice))
    report.section("Table 3: test error (%) with data augmentation", md_table(header, t3),
                   f"Mean (std) over seeds {list(s.seeds)}; T = {s.epochs_aug} epochs.")
    report.section("Table 4: test error (%) without data augmentation", md_table(header, t4),
                   f"T = {s.epochs_plain} epochs.")
    report.section(f"Table 5: wall-clock seconds (runs of Table {3 if s.wallclock_augment else 4})",
                   md_table(
        ["data set", "paper: Standard", "ours: Standard", f"paper: {EE}", f"ours: {EE}"], t5),
        "Ours: seconds of both training phases and the switch (no evaluation), on this machine "
        f"({ctx.device}); the paper's on a GPU workstation running nothing else.")
    augment = bool(s.datasets_aug)      # the paper's Fig. 4 is with augmentation
    panels = loss_curve_panels(main, (STANDARD, EE), s.datasets_aug or s.datasets_plain, augment)
    if panels:
        caption = f"Training loss {'with' if augment else 'without'} augmentation"
        report.figure(plot_panels(ctx.out / "fig4.png", panels, f"Fig. 4: {caption.lower()}",
                                  columns=min(3, len(panels))),
                      f"{caption}, mean ± std over trials (paper: Fig. 4, with augmentation)")
    if s.lbfgs_dataset:
        report.section(f"Table 6: test error (%) of {EE} with G̃ = L-BFGS on "
                       f"{display(s.lbfgs_dataset)}",
                       md_table(["augmentation", "ε", "τ0", "paper (MNIST)", "ours"], t6),
                       f"Seeds {list(s.lbfgs_seeds)}; the paper gives one number per cell.")
    if tl:
        report.section(f"Learning-rate study ({display(s.lr_dataset)}, "
                       f"{'with' if s.lr_augment else 'without'} augmentation)",
                       md_table(["method", "paper (MNIST, best lr)", "our best lr",
                                 "ours at best lr", "ours per lr"], tl),
                       f"lr ∈ {list(s.lr_grid)}, seeds {list(s.lr_seeds)}; best = lowest mean "
                       "test error, as the paper chose.")
    report.section("‖M(θ_T) − M(θ_0)‖_F² (quoted in §3.4.2 for Semeion)",
                   md_table(["method", "paper (Semeion)", "ours" + (f" ({display(s.ntk_dataset)})" if s.ntk_dataset else "")],
                            ntk_rows(main, s)))
    report.choices("resnet", "gates", "noise", "bn", "softplus", "semeion-split")
    report.runs(list(selection.values()) + main + lbfgs + lr_runs)
    write_results(ctx, {
        "experiment": ctx.experiment, "preset": ctx.preset, "settings": as_dict(s),
        "paper": {"table3": PAPER_TABLE3, "table4": PAPER_TABLE4, "table5": PAPER_TABLE5,
                  "table6": {f"{_aug(a)}-eps{e:g}-tau{t:g}": v for (a, e, t), v in PAPER_TABLE6.items()},
                  "lr_study": PAPER_LR_STUDY, "ntk_semeion": PAPER_NTK_SEMEION},
        "selected": {f"{d}-{_aug(a)}": {"eps": e, "tau0": t} for (d, a), (e, t) in choice.items()},
        "ours": {"table3": raw3, "table4": raw4, "table5": raw5, "table6": raw6, "lr_study": rawl},
        "runs": [run_record(r, "ntk_change") for r in
                 list(selection.values()) + main + lbfgs + lr_runs]})
    return report.write()


def _selection_text(s: Table3to5Settings, selection: dict[str, SubRun],
                    choice: Choice) -> str:
    if not s.select:
        return (f"Not run in this preset: ε = {s.eps:g}, τ0 = {s.tau0:g} fixed (the paper selects "
                "them per data set on an 80/20 split; `--preset paper` does).")
    rows = [[display(r.label["dataset"]), "yes" if r.label["augment"] else "no",
             f"{r.label['eps']:g}", f"{r.label['tau0']:g}", fmt_mean_std([r.summary["test_error"]], 100)]
            for r in selection.values()]
    chosen = "; ".join(f"{display(d)} {'aug' if a else 'no aug'}: ε = {e:g}, τ0 = {t:g}"
                       for (d, a), (e, t) in choice.items())
    return (md_table(["data set", "augmentation", "ε", "τ0", "validation error (%)"], rows)
            + f"\n\nTrained on {100 * (1 - s.holdout):.0f} % of the training set, validated on the "
            f"other {100 * s.holdout:.0f} % (fixed split), seed {s.seeds[0]}. Selected: {chosen}.")
