"""``gconv demo`` / ``make run``: the sine-wave story of [K22] §2.2 and §3.4.1 on the CPU.

Plain full-batch gradient descent on the 4-layer softplus MLP stays stuck at a high training
error on the sine wave (n = 100, y = 1{sin(20x) < 0}). The EE wrapper of the same GD (ε = 0.01,
τ = 2000, as in [K22] §3.4.1) explores with GD, perturbs θ(1:H−1), freezes the gates and then
exploits θ(H−1) alone — a convex problem. Three rows, every run at most as long as base GD's:

- base GD, lr 0.5;
- EE + GD with G̃ = G (the same full-batch GD at the same lr 0.5, [K22] §3.4.1);
- EE + L-BFGS as G̃ ([K22] Table 6's exploitation choice).

The table gives the final and the best (over logged steps) training error of each run. G̃ = G
descends slowly: the exploitation problem's curvature at τ spans ~16 orders of magnitude
(docs/reproduction.md, neco-fig2), so GD needs far more steps than a demo gives it; L-BFGS
solves it to zero error. Exploitation steps run in coefficient space
(:mod:`global_convergence.training.kernel_steps`).

Numbers are reproducible: every run uses one intra-op thread, whatever ``OMP_NUM_THREADS`` or
``torch.get_num_threads()`` was, so the same machine type prints the same table.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..training import TrainConfig, atomic_write_text, train

METHODS = ("base GD", "EE + GD", "EE + L-BFGS")
COLOURS = {"base GD": "tab:red", "EE + GD": "tab:blue", "EE + L-BFGS": "tab:green"}


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes. ε, τ, n and three trials are [K22] §3.4.1's; G's lr 0.5 is our choice
    (the paper's appendix B is not in our copy). ``exploit_steps`` follow τ for EE + GD; base GD
    gets ``tau + exploit_steps`` steps, at least as many as any EE run."""

    seeds: tuple[int, ...] = (0, 1, 2)
    n: int = 100
    tau: int = 2000
    eps: float = 0.01
    lr: float = 0.5
    exploit_steps: int = 4000
    lbfgs_steps: int = 40
    log_every: int = 20

    @property
    def base_steps(self) -> int:
        return self.tau + max(self.exploit_steps, self.lbfgs_steps)


TINY = DemoSettings(seeds=(0,), n=16, tau=10, exploit_steps=20, lbfgs_steps=3, log_every=5)
"""A seconds-long demo for tests."""


def variants(s: DemoSettings) -> dict[str, dict[str, Any]]:
    return {"base GD": dict(method="base", steps=s.base_steps),
            "EE + GD": dict(method="ee", steps=s.tau + s.exploit_steps, exploit_optimizer="same"),
            "EE + L-BFGS": dict(method="ee", steps=s.tau + s.lbfgs_steps, exploit_optimizer="lbfgs")}


def demo_config(variant: str, seed: int, s: DemoSettings = DemoSettings()) -> TrainConfig:
    options = variants(s)[variant]
    return TrainConfig(data="sine", model="mlp", seed=seed, n=s.n, optimizer="sgd", lr=s.lr,
                       momentum=0.0, weight_decay=0.0, batch_size=0, eps=s.eps,
                       tau=s.tau if options["method"] == "ee" else None, log_every=s.log_every,
                       **options)


def run_demo(out: str | Path, progress: bool = True, settings: DemoSettings = DemoSettings(),
             workers: int = 2) -> dict[str, Any]:
    """Train every method on every seed, print the table, write ``demo.png`` and ``results.json``.

    Every run uses one intra-op thread (restored afterwards): the sine-wave MLP's operations are
    tiny, extra threads only spin-wait, and a fixed thread count fixes the summation order of the
    chaotic lr-0.5 GD trajectory, so the numbers are the same on every run. ``workers`` runs
    that many trainings side by side in separate processes (each on one thread, so the numbers
    do not depend on it); 1 trains them one after another in this process.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(method, seed) for method in METHODS for seed in settings.seeds]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            done = list(pool.map(_one_run, [(out, m, k, settings, False) for m, k in tasks]))
    else:
        done = [_one_run((out, m, k, settings, progress)) for m, k in tasks]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    curves: dict[str, list[list[tuple[int, float]]]] = {m: [] for m in METHODS}
    for (method, _), (record, history) in zip(tasks, done):
        results[method].append(record)
        curves[method].append(history)
    print(format_table(results, settings))
    print(format_timings(results))
    plot_demo(curves, out / "demo.png", settings.tau)
    atomic_write_text(out / "results.json", json.dumps({"settings": asdict(settings),
                                                        "results": results}, indent=2))
    print(f"plot: {out / 'demo.png'}; per-run outputs under {out}/")
    return results


def _one_run(task: tuple[Path, str, int, DemoSettings, bool]
             ) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """Train one method on one seed with one intra-op thread; its record and error curve."""
    out, method, seed, s, progress = task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    history: list[tuple[int, float]] = []
    started = time.perf_counter()
    try:
        summary = train(demo_config(method, seed, s), out / _slug(method, seed), progress=progress,
                        callbacks=[lambda e: history.append((e.step, e.row["train_error"]))])
    finally:
        torch.set_num_threads(threads)
    record = {"seed": seed, "train_error": summary["train_error"],
              "best_train_error": min(e for _, e in history), "train_loss": summary["train_loss"],
              "steps": summary["steps"], "seconds": time.perf_counter() - started}
    return record, history


def _slug(method: str, seed: int) -> str:
    return method.lower().replace(" + ", "-").replace(" ", "-") + f"-s{seed}"


def format_table(results: dict[str, list[dict[str, Any]]], s: DemoSettings) -> str:
    """The demo's table: final and best training error per seed (no timings: they vary)."""
    seeds = [r["seed"] for r in next(iter(results.values()))]
    header = (f"{'method':<13}{'steps':>7}" + "".join(f"{'final s' + str(k):>10}" for k in seeds)
              + "".join(f"{'best s' + str(k):>9}" for k in seeds))
    lines = [f"Training error on the sine wave (n={s.n}, mlp, full-batch GD lr {s.lr}; "
             f"EE: eps={s.eps}, tau={s.tau}, G~ = G at lr {s.lr} or L-BFGS)",
             header, "-" * len(header)]
    for method, runs in results.items():
        final = "".join(f"{100 * r['train_error']:>9.0f}%" for r in runs)
        best = "".join(f"{100 * r['best_train_error']:>8.0f}%" for r in runs)
        lines.append(f"{method:<13}{runs[0]['steps']:>7}{final}{best}")
    return "\n".join(lines)


def format_timings(results: dict[str, list[dict[str, Any]]]) -> str:
    parts = [f"{m} {sum(r['seconds'] for r in runs) / len(runs):.1f} s" for m, runs in results.items()]
    return "seconds per run: " + ", ".join(parts)


def plot_demo(curves: dict[str, list[list[tuple[int, float]]]], path: Path, tau: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in curves.items():
        for i, history in enumerate(runs):
            steps, errors = zip(*history)
            ax.plot(steps, [100 * e for e in errors], color=COLOURS[method], alpha=0.8, lw=1.2,
                    label=method if i == 0 else None)
    ax.axvline(tau, color="gray", ls="--", lw=1)
    ax.text(tau, ax.get_ylim()[1] * 0.95, " τ (switch)", color="gray", va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("training error (%)")
    ax.set_title("Sine wave: base GD, EE + GD (G̃ = G), EE + L-BFGS; three seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
