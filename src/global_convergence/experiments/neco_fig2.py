"""[K22] Figures 2 and 3: the EE wrapper of gradient descent on the sine wave.

Same setting as Figure 1a (the `mlp`, n = 100, full-batch GD), three trials. The paper ([K22]
§3.4.1): with ε = 0.01, τ = 2000 and G̃ = G, the EE wrapper A(GD) reaches zero training error
where GD stays stuck. Rows, each at most as long as base GD's run:

- base GD (lr 0.5);
- EE + GD, G̃ = G: the same full-batch GD at the same learning rate after τ;
- EE + GD at the step ``1/L̂`` of the run's certificate (the step [K22] Theorem 5 assumes);
- EE + L-BFGS (the exploitation optimizer of [K22] Table 6);
- (``cpu`` and ``paper``) EE + GD, G̃ = G, run far longer: how many exploitation steps GD needs.
  No base run of that length is made (a full-network GD step costs ~100 exploitation steps).

Every exploitation step of GD runs in coefficient space (:mod:`..training.kernel_steps`), exactly.
The report adds the curvature of the exploitation problem: the spectrum of its Gram matrix
``K/n = ΦΦᵀ/n`` — fixed from τ on — and of the loss Hessian ``D^{1/2} K D^{1/2} / n`` at T, with
the steps ``1/(η λ)`` GD needs along each eigen-direction. Figure 3 plots
``‖M(θ_T) − M(θ_0)‖_F²`` over T; for EE it keeps growing after τ as θ(H−1) is trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training import build_run, load_checkpoint
from ..training.kernel_steps import ee_feature_map
from .figures import Panel, Series, plot_panels
from .ntk_tracking import ntk_callbacks
from .report import (Report, as_dict, fmt_mean_std, fmt_sci, last_value, md_table, mean_std,
                     run_record, write_results)
from .subruns import Context, Job, SubRun, base_config, cached_result, run_jobs

TITLE = "[K22] Figures 2 and 3: EE wrapper of GD on the sine wave"
SOURCE = "Kawaguchi, Neural Computation 34(4) 2022, §3.4.1, Figures 2 and 3"
PAPER = {"base GD": "stuck at a high training error (as in Fig. 1a)",
         "EE + GD": "0 training error (converges to a global minimum), G̃ = G",
         "EE + GD, step 1/L̂": "not in the paper (the step of its Theorem 5)",
         "EE + L-BFGS": "not in the paper (its Table 6's exploitation optimizer)",
         "EE + GD, long": "0 training error, G̃ = G",
         "figure 3": "‖M(θ_T) − M(θ_0)‖_F² large for both methods; EE increases it after τ"}
"""[K22] §3.4.1: the outcomes of Figures 2 and 3 (stated in the text, no numbers)."""
COLORS = {"base GD": "tab:red", "EE + GD": "tab:blue", "EE + GD, step 1/L̂": "tab:purple",
          "EE + L-BFGS": "tab:green", "EE + GD, long": "tab:cyan"}


@dataclass(frozen=True)
class Fig2Settings:
    """One preset of [K22] Fig. 2/3. G's lr 0.5 and the lengths are our choices (appendix B of
    the paper is not in our copy); ε, τ, n and three trials are the paper's. Base GD gets
    ``tau + exploit_steps`` steps, as many as the longest EE run beside it."""

    n: int = 100
    tau: int = 2000
    eps: float = 0.01
    lr: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)
    exploit_steps: int = 20000
    lbfgs_steps: int = 200
    long_exploit_steps: int = 0
    """EE + GD (G̃ = G) steps after τ of the long run; 0: no long run."""
    ntk_every: int = 200
    log_every: int = 100


PRESETS = {
    "smoke": Fig2Settings(tau=60, seeds=(0,), exploit_steps=140, lbfgs_steps=20, ntk_every=40,
                          log_every=20),
    "cpu": Fig2Settings(long_exploit_steps=200_000),
    "paper": Fig2Settings(exploit_steps=100_000, long_exploit_steps=3_000_000, ntk_every=1000),
}


def variants(s: Fig2Settings) -> dict[str, dict[str, Any]]:
    """The methods of the figure: base GD, A(GD) with G̃ = GD (at G's lr, at 1/L̂, and long),
    A(GD) with G̃ = L-BFGS."""
    ee = s.tau + s.exploit_steps
    out = {"base GD": dict(method="base", steps=ee),
           "EE + GD": dict(method="ee", steps=ee, exploit_optimizer="same"),
           "EE + GD, step 1/L̂": dict(method="ee", steps=ee, exploit_optimizer="same",
                                     exploit_lr="auto"),
           "EE + L-BFGS": dict(method="ee", steps=s.tau + s.lbfgs_steps, exploit_optimizer="lbfgs")}
    if s.long_exploit_steps:
        out["EE + GD, long"] = dict(method="ee", steps=s.tau + s.long_exploit_steps,
                                    exploit_optimizer="same")
    return out


def jobs(ctx: Context, s: Fig2Settings) -> list[Job]:
    out = []
    for variant, options in variants(s).items():
        long = variant == "EE + GD, long"
        for seed in s.seeds:
            config = base_config(ctx, data="sine", model="mlp", seed=seed, n=s.n, optimizer="sgd",
                                 lr=s.lr, momentum=0.0, weight_decay=0.0, batch_size=0,
                                 tau=s.tau if options["method"] == "ee" else None, eps=s.eps,
                                 log_every=max(s.log_every, options["steps"] // 1000) if long
                                 else s.log_every, **options)
            key = _slug(variant) + f"-s{seed}"
            # ‖ΔM‖² of the long run at 0 and T only: its curve is the one of EE + GD
            tracker = ntk_callbacks(options["steps"], None if long else s.ntk_every)
            out.append(Job(key, config, tracker, {"variant": variant, "seed": seed}))
    return out


def _slug(variant: str) -> str:
    return (variant.lower().replace(" + ", "-").replace(", step 1/l̂", "-step-inverse-l")
            .replace(", ", "-").replace(" ", "-"))


def certificate_facts(run: SubRun) -> dict[str, Any] | None:
    """Safe-exploration verdict at the switch, 1/L̂, the step used and why no bound (if none)."""
    cert = run.summary.get("certificate")
    if not cert:
        return None
    return {"seed": run.label["seed"], "verdict": cert["condition"]["verdict"],
            "rank": cert["condition"].get("rank"),
            "n": cert["condition"].get("n"), "step_max": cert.get("step_max"),
            "step_used": cert.get("step_used"), "bound_given": cert.get("bound") is not None,
            "withheld_because": cert.get("bound_withheld_because")}


def plot(ctx: Context, runs: list[SubRun], s: Fig2Settings) -> tuple[str, str]:
    """Fig. 2 (training error and loss over steps, three trials; the long EE + GD run in a panel
    of its own) and Fig. 3 (‖ΔM‖² over steps)."""
    errors, losses, changes, long = [], [], [], []
    for r in runs:
        variant = r.label["variant"]
        label = variant if r.label["seed"] == s.seeds[0] else None
        steps, err = r.column("train_error")
        curve = Series(label, steps, [100 * e for e in err], COLORS[variant])
        if variant == "EE + GD, long":
            long.append(curve)
            continue
        errors.append(curve)
        losses.append(Series(label, *r.column("loss"), COLORS[variant]))
        changes.append(Series(label, *r.column("ntk_change"), COLORS[variant]))
    panels = [Panel("Fig. 2: training error, three trials", "step T", "training error (%)", errors,
                    vline=s.tau),
              Panel("training loss, three trials", "step T", "training loss", losses, logy=True,
                    vline=s.tau)]
    if long:
        panels.append(Panel("EE + GD (G̃ = G), long exploitation", "step T", "training error (%)",
                            long, vline=s.tau))
    fig2 = plot_panels(ctx.out / "fig2.png", panels)
    fig3 = plot_panels(ctx.out / "fig3.png", [Panel(
        "Fig. 3: ‖M(θ_T) − M(θ_0)‖_F²", "step T", "‖M(θ_T) − M(θ_0)‖²", changes, logy=True,
        vline=s.tau)])
    return fig2, fig3


def run(ctx: Context, s: Fig2Settings) -> Path:
    """Train, tabulate, plot and write the report of [K22] Fig. 2 and 3."""
    runs = list(run_jobs(ctx, jobs(ctx, s)).values())
    fig2, fig3 = plot(ctx, runs, s)
    by_variant: dict[str, list[SubRun]] = {}
    for r in runs:
        by_variant.setdefault(r.label["variant"], []).append(r)
    rows, results = [], {}
    for variant, mine in by_variant.items():
        results[variant] = variant_results(mine, s)
        v = results[variant]
        rows.append([variant, PAPER[variant], v["steps"], fmt_mean_std(v["train_error"], 100),
                     _per_seed(v["train_error"]), _per_seed(v["best_train_error"]),
                     ", ".join("—" if z is None else str(z) for z in v["first_zero_step"]),
                     ", ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(v["train_loss_at_tau"],
                                                                   v["train_loss"])),
                     fmt_sci(mean_std(v["ntk_change_at_tau"])[0]),
                     fmt_sci(mean_std(v["ntk_change_final"])[0]),
                     fmt_mean_std(v["seconds"], 1, 1)])
    curvature = [exploitation_curvature(ctx, r, s) for r in by_variant.get("EE + GD", [])]
    report = Report(ctx, TITLE, SOURCE, s)
    report.section("Data", f"- `sine`: generated (docs/reproduction.md), n = {s.n}, "
                           "y = 1{sin(20x) < 0}")
    report.section(
        "Figure 2 (training error) and Figure 3 (representation change)",
        md_table(["method", "paper", "steps", "ours: final train error (%) mean (std)",
                  "final, per seed", "best logged, per seed", "first step at 0 %",
                  f"train loss at τ = {s.tau} → T, per seed", f"‖ΔM‖² at τ = {s.tau}",
                  "‖ΔM‖² at T", "seconds"], rows),
        "Paper, Figure 3: " + PAPER["figure 3"] + ". ‖ΔM‖² is over all parameters; after τ the EE "
        "gates are fixed buffers, so θ = (trunk, θ(H−1), W(H)). Base GD runs as many steps as "
        "the EE runs beside it (the long EE + GD run excepted).")
    report.section("Curvature of the exploitation problem ([K22] §3.3, Theorem 5)",
                   curvature_text(curvature, s))
    report.section("Certificates at the switch ([K22] Theorem 5)", _certificate_text(results))
    report.figure(fig2, "Training error over steps, three trials (paper: Fig. 2)")
    report.figure(fig3, "‖M(θ_T) − M(θ_0)‖_F² over steps (paper: Fig. 3)")
    report.choices("mlp", "ee-mlp", "gates", "noise", "softplus")
    report.runs(runs)
    write_results(ctx, {"experiment": ctx.experiment, "preset": ctx.preset, "settings": as_dict(s),
                        "paper": PAPER, "ours": results, "curvature": curvature,
                        "runs": [run_record(r, "ntk_change") for r in runs]})
    return report.write()


def variant_results(mine: list[SubRun], s: Fig2Settings) -> dict[str, Any]:
    """Final and best logged training error, first logged step at 0 %, losses, ‖ΔM‖², time."""
    return {"train_error": [r.summary["train_error"] for r in mine],
            "best_train_error": [min(r.column("train_error")[1]) for r in mine],
            "first_zero_step": [_first_zero(r) for r in mine],
            "steps": mine[0].summary["steps"],
            "train_loss_at_tau": [_value_at(r, "loss", s.tau) for r in mine],
            "train_loss": [r.summary["train_loss"] for r in mine],
            "ntk_change_at_tau": [_logged_at(r, "ntk_change", s.tau) for r in mine],
            "ntk_change_final": [last_value(r, "ntk_change") for r in mine],
            "seconds": [r.seconds for r in mine],
            "certificate": [certificate_facts(r) for r in mine]}


def _per_seed(errors: list[float]) -> str:
    return ", ".join(f"{100 * e:.0f}" for e in errors)


def _first_zero(run: SubRun) -> int | None:
    steps, errors = run.column("train_error")
    return next((t for t, e in zip(steps, errors) if e == 0), None)


def exploitation_curvature(ctx: Context, run: SubRun, s: Fig2Settings) -> dict[str, Any]:
    """Spectrum of the exploitation problem of one EE run, from its final state.

    Phase 2 trains ``w ↦ L(Φ w)`` with Φ fixed from τ on, so the Gram ``K/n = ΦΦᵀ/n`` is the
    one at τ; the loss Hessian at T is ``Φᵀ D Φ / n`` with ``D = diag(σ(f)(1 − σ(f)))``, whose
    nonzero eigenvalues are those of ``D^{1/2} K D^{1/2} / n`` (float64). Full-batch GD with step
    η is stable along eigenvalue λ when ``η λ < 2`` and needs ~``1/(η λ)`` steps to move along it.
    """
    def compute() -> dict[str, Any]:
        built = build_run(run.job.config)
        built.model.load_state_dict(load_checkpoint(run.folder / "checkpoint.pt")["model"])
        built.model.eval()
        with torch.no_grad():
            head = built.model.head
            feature_map = ee_feature_map(head, built.model.features(built.x))
            kernel = feature_map.kernel()[0]
            f = feature_map.outputs([head.weight.detach()])[:, 0]
        n = kernel.shape[0]
        d = (torch.sigmoid(f) * torch.sigmoid(-f)).sqrt()
        gram = torch.linalg.eigvalsh(kernel / n).numpy()
        hessian = torch.linalg.eigvalsh(d[:, None] * kernel * d[None, :] / n).numpy()
        exploit = run.summary["steps"] - s.tau
        return {"seed": run.label["seed"], "gram": _quantiles(gram), "hessian_T": _quantiles(hessian),
                "stable_step_at_T": float(2 / hessian[-1]), "lr": s.lr, "exploit_steps": exploit,
                "out_of_reach": int(np.sum(s.lr * hessian * exploit < 1))}
    return cached_result(ctx, f"curvature-s{run.label['seed']}-T{run.summary['steps']}", compute,
                         of_run=run.job.config)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q25", "median", "q75", "max"), (float(v) for v in q)))


def curvature_text(curvature: list[dict[str, Any]], s: Fig2Settings) -> str:
    if not curvature:
        return "No EE + GD runs."
    rows = [[c["seed"]] + [fmt_sci(c["gram"][k]) for k in ("min", "median", "max")]
            + [fmt_sci(c["hessian_T"][k]) for k in ("min", "q25", "median", "q75", "max")]
            + [f"{c['stable_step_at_T']:.3g}", f"{c['out_of_reach']} of {s.n}"] for c in curvature]
    return md_table(["seed", "K/n: min", "median", "max", "Hessian at T: min", "q25", "median",
                     "q75", "max", f"stable step 2/λ_max", f"directions with η λ (T − τ) < 1 "
                     f"(η = {s.lr})"], rows) + (
        f"\n\nThe Gram matrix is fixed from τ on; {_span_text(curvature)} "
        "Full-batch GD moves along an eigen-direction of curvature λ only after ~1/(η λ) steps, "
        "and G's step must stay below 2/λ_max, so the directions counted in the last column are "
        "out of reach within the run; L-BFGS, which rescales by curvature, is not limited so.")


def _span_text(curvature: list[dict[str, Any]]) -> str:
    """How many orders of magnitude the measured ``K/n`` spectra span (per seed): ``max/min``,
    where the float64 ``min`` is positive."""
    spans = [math.log10(c["gram"]["max"] / c["gram"]["min"]) for c in curvature
             if c["gram"]["min"] > 0 and c["gram"]["max"] > 0]
    if not spans:
        return "its smallest computed eigenvalue is not positive (at float64 rounding)."
    low, high = min(spans), max(spans)
    orders = f"{low:.1f}" if high - low < 0.05 else f"{low:.1f}–{high:.1f}"
    rest = "" if len(spans) == len(curvature) else \
        f" ({len(curvature) - len(spans)} seed(s) with a smallest eigenvalue ≤ 0 left out)"
    return f"its spectrum spans {orders} orders of magnitude{rest}."


def _logged_at(run: SubRun, key: str, step: int) -> float | None:
    """The value of ``key`` logged at ``step`` itself (None: not logged there)."""
    return next((r[key] for r in run.rows if r["step"] == step and r.get(key) is not None), None)


def _value_at(run: SubRun, key: str, step: int) -> float | None:
    """The logged value of ``key`` at the last logged step ≤ ``step``."""
    values = [r[key] for r in run.rows if r.get(key) is not None and r["step"] <= step]
    return values[-1] if values else None


def _certificate_text(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for variant, values in results.items():
        for facts in values["certificate"]:
            if facts is None:
                continue
            bound = "bound given" if facts["bound_given"] else \
                "no bound (" + ", ".join(facts["withheld_because"]) + " fails)"
            lines.append(f"- {variant}, seed {facts['seed']}: safe exploration "
                         f"**{facts['verdict']}** (rank "
                         f"{facts['rank']} of n = {facts['n']}); step allowed 1/L̂ = "
                         f"{facts['step_max']:.3g}, step used {facts['step_used']:.3g}; {bound}")
    return "\n".join(lines) or "No EE runs."
