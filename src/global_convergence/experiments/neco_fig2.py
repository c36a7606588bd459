"""[K22] Figures 2 and 3: the EE wrapper of gradient descent on the sine wave.

Same setting as Figure 1a (the `mlp`, n = 100, full-batch GD), three trials. Plain GD stays stuck
at a high training error; the EE wrapper A(GD) with ε = 0.01 and τ = 2000 explores with GD, perturbs
θ(1:H−1), freezes the gates and exploits by training θ(H−1) alone, reaching zero training error.
Two exploitation algorithms (SPEC §5): G̃ = G (full-batch GD with the step ``1/L̂`` of the
certificate — the largest Theorem 5 allows, so its bound holds — on cached trunk features; each
step is cheap, so it runs longer) and G̃ = L-BFGS. Figure 3 plots
``‖M(θ_T) − M(θ_0)‖_F²`` over T; for EE it keeps growing after τ as θ(H−1) is trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .figures import Panel, Series, plot_panels
from .ntk_tracking import ntk_callbacks
from .report import (Report, as_dict, fmt_mean_std, fmt_sci, last_value, md_table, mean_std,
                     run_record, write_results)
from .subruns import Context, Job, SubRun, base_config, run_jobs

TITLE = "[K22] Figures 2 and 3: EE wrapper of GD on the sine wave"
SOURCE = "Kawaguchi, Neural Computation 34(4) 2022, §3.4.1, Figures 2 and 3"
PAPER = {"base GD": "stuck at a high training error (as in Fig. 1a)",
         "EE + GD": "0 training error (converges to a global minimum)",
         "EE + L-BFGS": "not in the paper (SPEC §5 adds it)",
         "figure 3": "‖M(θ_T) − M(θ_0)‖_F² large for both methods; EE increases it after τ"}
"""[K22] §3.4.1: the outcomes of Figures 2 and 3 (stated in the text, no numbers)."""
COLORS = {"base GD": "tab:red", "EE + GD": "tab:blue", "EE + L-BFGS": "tab:green"}


@dataclass(frozen=True)
class Fig2Settings:
    """One preset of [K22] Fig. 2/3. G's lr 0.5 and the lengths are our choices (appendix B of
    the paper is not in our copy); ε, τ, n and three trials are the paper's."""

    n: int = 100
    tau: int = 2000
    eps: float = 0.01
    lr: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)
    base_steps: int = 4000
    ee_gd_steps: int = 22000
    ee_lbfgs_steps: int = 4000
    ntk_every: int = 200


PRESETS = {
    "smoke": Fig2Settings(tau=60, seeds=(0,), base_steps=120, ee_gd_steps=200, ee_lbfgs_steps=80,
                          ntk_every=40),
    "cpu": Fig2Settings(),
    "paper": Fig2Settings(ee_gd_steps=102000, ntk_every=100),
}


def variants(s: Fig2Settings) -> dict[str, dict[str, Any]]:
    """The three methods of the figure: base GD, A(GD) with G̃ = GD, A(GD) with G̃ = L-BFGS."""
    return {"base GD": dict(method="base", steps=s.base_steps),
            "EE + GD": dict(method="ee", steps=s.ee_gd_steps, exploit_optimizer="same",
                            exploit_lr="auto"),
            "EE + L-BFGS": dict(method="ee", steps=s.ee_lbfgs_steps, exploit_optimizer="lbfgs")}


def jobs(ctx: Context, s: Fig2Settings) -> list[Job]:
    out = []
    for variant, options in variants(s).items():
        for seed in s.seeds:
            config = base_config(ctx, data="sine", model="mlp", seed=seed, n=s.n, optimizer="sgd",
                                 lr=s.lr, momentum=0.0, weight_decay=0.0, batch_size=0,
                                 tau=s.tau if options["method"] == "ee" else None, eps=s.eps,
                                 **options)
            key = variant.lower().replace(" + ", "-").replace(" ", "-") + f"-s{seed}"
            out.append(Job(key, config, ntk_callbacks(options["steps"], s.ntk_every),
                           {"variant": variant, "seed": seed}))
    return out


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
    """Fig. 2 (training error over steps, three trials) and Fig. 3 (‖ΔM‖² over steps)."""
    errors, losses, changes = [], [], []
    for r in runs:
        variant = r.label["variant"]
        first = r.label["seed"] == s.seeds[0]
        steps, err = r.column("train_error")
        errors.append(Series(variant if first else None, steps, [100 * e for e in err],
                             COLORS[variant]))
        losses.append(Series(variant if first else None, *r.column("loss"), COLORS[variant]))
        changes.append(Series(variant if first else None, *r.column("ntk_change"), COLORS[variant]))
    fig2 = plot_panels(ctx.out / "fig2.png", [
        Panel("Fig. 2: training error, three trials", "step T", "training error (%)", errors,
              vline=s.tau),
        Panel("training loss, three trials", "step T", "training loss", losses, logy=True,
              vline=s.tau)])
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
        errors = [r.summary["train_error"] for r in mine]
        at_tau = [_value_at(r, "ntk_change", s.tau) for r in mine]
        final = [last_value(r, "ntk_change") for r in mine]
        loss_at_tau = [_value_at(r, "loss", s.tau) for r in mine]
        final_loss = [r.summary["train_loss"] for r in mine]
        results[variant] = {"train_error": errors, "steps": mine[0].summary["steps"],
                            "train_loss_at_tau": loss_at_tau, "train_loss": final_loss,
                            "ntk_change_at_tau": at_tau, "ntk_change_final": final,
                            "seconds": [r.seconds for r in mine],
                            "certificate": [certificate_facts(r) for r in mine]}
        rows.append([variant, PAPER[variant], mine[0].summary["steps"],
                     fmt_mean_std(errors, 100), ", ".join(f"{100 * e:.0f}" for e in errors),
                     ", ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(loss_at_tau, final_loss)),
                     fmt_sci(mean_std(at_tau)[0]), fmt_sci(mean_std(final)[0]),
                     fmt_mean_std([r.seconds for r in mine], 1, 1)])
    report = Report(ctx, TITLE, SOURCE, s)
    report.section("Data", f"- `sine`: generated (SPEC §6), n = {s.n}, y = 1{{sin(20x) < 0}}")
    report.section(
        "Figure 2 (training error) and Figure 3 (representation change)",
        md_table(["method", "paper", "steps", "ours: final train error (%) mean (std)",
                  "per seed", f"train loss at τ = {s.tau} → T, per seed",
                  f"‖ΔM‖² at τ = {s.tau}", "‖ΔM‖² at T", "seconds"], rows),
        "Paper, Figure 3: " + PAPER["figure 3"] + ". ‖ΔM‖² is over all parameters; after τ the EE "
        "gates are fixed buffers, so θ = (trunk, θ(H−1), W(H)).")
    report.section("Certificates at the switch ([K22] Theorem 5)", _certificate_text(results))
    report.figure(fig2, "Training error over steps, three trials (paper: Fig. 2)")
    report.figure(fig3, "‖M(θ_T) − M(θ_0)‖_F² over steps (paper: Fig. 3)")
    report.choices("mlp", "ee-mlp", "gates", "noise", "softplus")
    report.runs(runs)
    write_results(ctx, {"experiment": ctx.experiment, "preset": ctx.preset, "settings": as_dict(s),
                        "paper": PAPER, "ours": results,
                        "runs": [run_record(r, "ntk_change") for r in runs]})
    return report.write()


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
