"""[KS21] Table 1 and Figure 2: base vs the two-phase method A(base) on PreAct-ResNet-18.

The network is ``preact-resnet18`` with a fully connected last hidden layer of ``⌈1.1·n⌉``
softplus units added ([KS21] §7); *base* is SGD (batch 64, momentum 0.9, weight decay 1e-5,
lr 0.01) on that network (``wide_layer=True``), *A(base)* its two-phase version with τ0 = 0.6,
δ0 = 0.001 (fixed on KMNIST, ``aaai-table2``). T = 100 epochs without augmentation, 400 with; five
trials. Column 3 of Table 1, the expressivity condition, is checked as the paper did: PyTorch's
default initialisation with seed 1 (``gconv verify expressivity``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from .figures import loss_curve_panels, plot_panels
from .recipes import SGDRecipe, image_config
from .report import (Report, as_dict, beside_paper, fmt_mean_std, group, md_table, run_record,
                     test_errors, write_results)
from .standins import (SMALL_DIGITS, STAND_INS, data_arg, data_note, display, paper_row,
                       require_datasets)
from .subruns import Context, Job, cached_result, run_jobs
from .verify import verify

TITLE = "[KS21] Table 1 and Figure 2: base vs A(base) with guarantee, PreAct-ResNet-18"
SOURCE = "Kawaguchi & Sun, AAAI 2021, §7.1–7.2, Table 1, Figure 2"
BASE, TWO_PHASE = "base", "A(base)"

PAPER_TABLE1 = {  # (data set, augmentation) -> ((mean, std) base, (mean, std) A(base)), test error %
    ("mnist", False): ((0.41, 0.02), (0.38, 0.04)), ("mnist", True): ((0.34, 0.03), (0.28, 0.04)),
    ("cifar10", False): ((13.99, 0.17), (13.57, 0.32)), ("cifar10", True): ((7.01, 0.18), (6.84, 0.16)),
    ("cifar100", False): ((41.43, 0.43), (40.78, 0.22)),
    ("cifar100", True): ((27.92, 0.36), (27.41, 0.58)),
    ("svhn", False): ((4.51, 0.04), (4.50, 0.09)), ("svhn", True): ((4.32, 0.06), (4.16, 0.16)),
}
PAPER_TRAINING = {"mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}
"""Training-set sizes and the expressivity verdict ('Verified' for all) of Table 1."""


@dataclass(frozen=True)
class AaaiTable1Settings:
    """One preset of [KS21] Table 1 / Fig. 2."""

    datasets: tuple[str, ...] = ("mnist", "cifar10", "cifar100", "svhn")
    augment: tuple[bool, ...] = (False, True)
    n: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs_plain: int = 100
    epochs_aug: int = 400
    recipe: SGDRecipe = SGDRecipe(lr=0.01)
    tau0: float = 0.6
    delta0: float = 1e-3
    expressivity_seed: int = 1


PRESETS = {
    "smoke": AaaiTable1Settings(datasets=(SMALL_DIGITS,), augment=(False,), seeds=(0,),
                                epochs_plain=2, epochs_aug=2),
    "cpu": AaaiTable1Settings(datasets=("digits",), n=500, seeds=(0, 1), epochs_plain=10,
                              epochs_aug=20, recipe=SGDRecipe(lr=0.01, log_epochs=2)),
    "paper": AaaiTable1Settings(),
}


def jobs(ctx: Context, s: AaaiTable1Settings) -> list[Job]:
    """Base and A(base) for every data set, augmentation setting and seed."""
    out = []
    for data, augment, method, seed in itertools.product(s.datasets, s.augment,
                                                         (BASE, TWO_PHASE), s.seeds):
        config = image_config(
            ctx, s.recipe, data=data, model="preact-resnet18",
            method="base" if method == BASE else "two-phase", seed=seed, augment=augment,
            epochs=s.epochs_aug if augment else s.epochs_plain, n=s.n, tau0=s.tau0,
            delta0=s.delta0, wide_layer=method == BASE)
        slug = "base" if method == BASE else "two-phase"
        out.append(Job(f"{data}-{'aug' if augment else 'plain'}-{slug}-s{seed}", config,
                       label={"dataset": data, "augment": augment, "method": method, "seed": seed}))
    return out


def expressivity(ctx: Context, data: str, n: int | None, seed: int) -> dict:
    """[KS21] Assumption 1 on the wide-layer PreAct-ResNet-18 at its default init (seed 1)."""
    def compute() -> dict:
        verdict = verify("expressivity", data=data_arg(ctx, data), model="preact-resnet18", n=n,
                         seed=seed, data_root=ctx.data_root, device=ctx.device)
        return {"dataset": data, "verdict": verdict.to_dict()}
    return cached_result(ctx, f"expressivity-{data}-n{n or 'all'}-s{seed}", compute)


def expressivity_rows(verdicts: dict[str, dict]) -> list[list]:
    """Every paper row ('Verified' at the paper's n) with our verdict where we checked it."""
    rows, used = [], set()
    for name, n in PAPER_TRAINING.items():
        mine = next((d for d in verdicts if paper_row(d) == name), None)
        used.add(mine)
        name = display(name) if mine in (None, name) else f"{display(name)} — ours: {display(mine)}"
        ours = _verdict_cells(verdicts[mine]) if mine else ("—", "not run")
        rows.append([name, n, "Verified", *ours])
    rows += [[display(d), "—", "—", *_verdict_cells(v)] for d, v in verdicts.items()
             if d not in used]
    return rows


def _verdict_cells(result: dict) -> tuple[int, str]:
    v = result["verdict"]
    return v["n"], f"**{v['verdict']}** (rank {v['rank']} / {v['n']})"


def run(ctx: Context, s: AaaiTable1Settings) -> Path:
    """Check expressivity, train both methods, tabulate beside [KS21] Table 1, plot Fig. 2."""
    require_datasets(ctx, s.datasets)
    verdicts = {d: expressivity(ctx, d, s.n, s.expressivity_seed) for d in s.datasets}
    runs = list(run_jobs(ctx, jobs(ctx, s)).values())
    raw = {}
    for (data, augment), mine in group(runs, "dataset", "augment").items():
        by_method = group(mine, "method")
        raw[(data, augment)] = {m: test_errors(by_method.get((m,), [])) for m in (BASE, TWO_PHASE)}
    ours = {k: [fmt_mean_std(v[m], 100) for m in (BASE, TWO_PHASE)] for k, v in raw.items()}
    errors = beside_paper(PAPER_TABLE1, ours, to_paper=lambda k: (paper_row(k[0]), k[1]),
                          label=lambda k: f"{display(k[0])}, {'with' if k[1] else 'no'} augmentation")
    report = Report(ctx, TITLE, SOURCE, s)
    report.section("Data", "\n".join(f"- `{d}`: {data_note(d, ctx.data_root)}" for d in s.datasets)
                   + ("\n\nThe Semeion stand-ins are not in the paper's Table 1 (it has no "
                      "Semeion row); their paper columns stay empty."
                      if any(d in STAND_INS for d in s.datasets) else ""))
    report.section("Table 1, columns 2–3: the expressivity condition (Assumption 1)",
                   md_table(["data set", "paper n", "paper", "our n", "ours"],
                            expressivity_rows(verdicts)))
    report.section(
        "Table 1: test error (%)",
        md_table(["data set", "paper: base", "ours: base", "paper: A(base)", "ours: A(base)"],
                 errors),
        "Both methods train the same network, PreAct-ResNet-18 with the added ⌈1.1·n⌉ softplus "
        f"layer; base = SGD lr {s.recipe.lr}, A(base) = its two-phase version. "
        f"Mean (std) over seeds {list(s.seeds)}. T = {s.epochs_plain} epochs without "
        f"augmentation, {s.epochs_aug} with; τ0 = {s.tau0}, δ0 = {s.delta0}. Expressivity: "
        f"rank([h_X, 1_n]) = n at PyTorch's default initialisation, seed {s.expressivity_seed}, "
        "float64 (docs/verifiers.md).")
    figures = []
    for augment in s.augment:
        panels = loss_curve_panels(runs, (BASE, TWO_PHASE), s.datasets, augment)
        if panels:
            name = f"fig2-{'aug' if augment else 'plain'}.png"
            figures.append(plot_panels(ctx.out / name, panels, "Fig. 2: training loss",
                                       columns=min(4, len(panels))))
    for figure in figures:
        report.figure(figure, "Training loss of base and A(base), mean ± std (paper: Fig. 2)")
    report.choices("resnet", "noise", "bn", "softplus")
    report.runs(runs)
    write_results(ctx, {"experiment": ctx.experiment, "preset": ctx.preset, "settings": as_dict(s),
                        "paper": {f"{d}-{'aug' if a else 'plain'}": v
                                  for (d, a), v in PAPER_TABLE1.items()},
                        "expressivity": verdicts,
                        "ours": {f"{d}-{'aug' if a else 'plain'}": v for (d, a), v in raw.items()},
                        "runs": [run_record(r) for r in runs]})
    return report.write()
