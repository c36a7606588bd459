"""Benchmark of the cheap second phase (docs/performance.md) and of whole wrapped runs against base runs.

Everything is measured in one run of this script, on the same machine state, and printed as
ratios against the targets of the issue (2 CPU cores, ResNet-18 on 16×16 inputs, no
augmentation):

* phase-2 epoch (cached features) ≤ 1/10 of a phase-1 epoch, after the one-time feature pass;
* a full EE run with τ0 = 0.6 ≤ 0.7 × the base run of the same epochs (wall-clock of ``train``:
  steps, per-epoch evaluation, the switch with its certificate).

The certificate is timed twice: as runs make it (``certificate_precision="auto"``: on the CPU
from the float32 feature cache, noise floor counted; on CUDA float64 at once) and with a float64
feature pass.

Part 1 drives one EE run by hand with the loop's own functions (``train_step``, the wrapper's
switch, ``enter_phase2``) and times: phase-1 epochs, the switch (perturbation + batch-norm
statistics pass), the certificate, the feature pass, phase-2 epochs on cached features and
phase-2 epochs recomputing the frozen trunk (``cache_features=False``), and one evaluation pass
in each phase. Epoch figures are medians over ``--epochs-timed`` epochs after one warm-up step.

Part 2 runs ``train`` for base and EE (and, with ``--two-phase``, two-phase) for the same number
of epochs, alternating base and wrapped runs ``--repeats`` times; ratios use the medians.

Usage::

    python benchmarks/bench_phases.py                          # random 16×16, n = 256, 2 threads
    python benchmarks/bench_phases.py --data digits --n 384    # the digits stand-in
    python benchmarks/bench_phases.py --quick                  # smaller, for a smoke check
    python benchmarks/bench_phases.py --device cuda --data cifar-like.npz --n 10000 \
        --batch-size 128 --amp                                 # on a GPU (gpu_check.sh)

On the CPU (the default) it runs with float32 subnormals flushed to zero, as ``gconv train``
does (docs/performance.md: softplus(100) produces subnormals that x86 computes on many times slower); on
CUDA every timer waits for the queued kernels (``torch.cuda.synchronize``). The machine load
(``os.getloadavg``) is printed before and after: timings on a shared machine are noisy, ratios
measured within one run less so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from global_convergence.models import flush_denormals
from global_convergence.training import TrainConfig, build_run, loop, train

TARGET_PHASE2_OVER_PHASE1 = 0.1
TARGET_EE_OVER_BASE = 0.7


def synchronize() -> None:
    """Wait for queued CUDA work, so that a timer stops when the work is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - started


def epoch(run) -> float:
    """Seconds of one epoch of training steps (the loop's ``train_step``, no evaluation)."""
    def steps():
        for _ in range(run.schedule.steps_per_epoch):
            loop.train_step(run)
            run.step += 1
    return timed(steps)


def phase_costs(config: TrainConfig, epochs_timed: int) -> dict[str, float]:
    """Part 1: the pieces of one EE run, timed separately."""
    run = build_run(config)
    loop.attach_train_module(run)
    out: dict[str, float] = {}
    loop.train_step(run)                                 # warm-up (allocations, first-call costs)
    run.step += 1
    out["phase1_epoch"] = statistics.median(epoch(run) for _ in range(epochs_timed))
    out["evaluation_phase1"] = timed(lambda: loop.evaluate(run))
    # the switch as the wrapper does it at step τ: perturbation, batch-norm statistics, freezing
    run.wrapper.step_count = run.wrapper.tau
    out["switch_perturb_bn"] = timed(run.wrapper.switch)
    out["feature_pass"] = timed(lambda: loop.enter_phase2(run))
    certificate: dict = {}
    out["certificate"] = timed(lambda: certificate.update(loop.make_certificate(run)))
    out["certificate_feature_precision"] = certificate["condition"]["feature_precision"]
    out["certificate_verdict"] = certificate["condition"]["verdict"]
    exact = dataclasses.replace(run.config, certificate_precision="float64")
    out["certificate_float64"] = timed(
        lambda: loop.make_certificate(dataclasses.replace(run, config=exact)))
    loop.train_step(run)
    run.step += 1
    out["phase2_epoch_cached"] = statistics.median(epoch(run) for _ in range(epochs_timed))
    out["evaluation_phase2_cached"] = timed(lambda: loop.evaluate(run))
    run.cache = run.kernel = None                        # the uncached path: frozen trunk per step
    loop.attach_train_module(run)
    loop.train_step(run)
    run.step += 1
    out["phase2_epoch_uncached"] = statistics.median(epoch(run) for _ in range(epochs_timed))
    out["evaluation_phase2_uncached"] = timed(lambda: loop.evaluate(run))
    return out


def full_runs(base: dict, epochs: int, repeats: int, methods: list[str]) -> dict[str, list[float]]:
    """Part 2: wall-clock of ``train`` for each method, alternating, ``repeats`` times."""
    seconds: dict[str, list[float]] = {m: [] for m in ["base", *methods]}
    for _ in range(repeats):
        for method in seconds:
            config = TrainConfig(**base, method=method, epochs=epochs)
            seconds[method].append(timed(lambda: train(config, None, progress=False)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="random",
                        help="random | digits (16×16×1) | a .npz file (x: N×C×H×W, y: labels)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both phases (as gconv train --compile)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the full runs (part 2)")
    parser.add_argument("--epochs-timed", type=int, default=3, help="epochs timed per phase (part 1)")
    parser.add_argument("--repeats", type=int, default=1, help="base/wrapped pairs in part 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--two-phase", action="store_true", help="also time two-phase runs")
    parser.add_argument("--quick", action="store_true", help="n = 128, 5 epochs, 2 timed epochs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.n, args.epochs, args.epochs_timed = 128, 5, 2
    torch.set_num_threads(args.threads)
    loop.plot_run = lambda *a, **k: []
    base = dict(data=args.data, n=args.n, model="resnet18", batch_size=args.batch_size, lr=0.05,
                tau0=0.6, device=args.device, amp=args.amp, compile=args.compile,
                channels_last=args.channels_last)
    where = (torch.cuda.get_device_name() if args.device == "cuda" else
             f"CPU, {torch.get_num_threads()} threads, flush-to-zero on")
    shape = "16×16×1" if args.data in ("random", "digits") else "from the file"
    print(f"ResNet-18 (softplus), {args.data} ({shape}), n = {args.n}, batch {args.batch_size}, "
          f"no augmentation, torch {torch.__version__}, {where}, amp {args.amp}, compile "
          f"{args.compile}, channels-last {args.channels_last}, load average "
          f"{os.getloadavg()[0]:.2f}")
    with flush_denormals(True):
        part1 = phase_costs(TrainConfig(**base, method="ee", epochs=args.epochs), args.epochs_timed)
    methods = ["ee"] + (["two-phase"] if args.two_phase else [])
    part2 = full_runs(base, args.epochs, args.repeats, methods)
    medians = {m: statistics.median(v) for m, v in part2.items()}

    p1, cached, uncached = part1["phase1_epoch"], part1["phase2_epoch_cached"], part1["phase2_epoch_uncached"]
    rows = [
        ("phase-1 epoch (steps)", f"{p1:.3f} s", ""),
        ("switch: perturbation + BN statistics pass", f"{part1['switch_perturb_bn']:.3f} s", ""),
        ("switch: feature pass (cache train set)", f"{part1['feature_pass']:.3f} s",
         f"{part1['feature_pass'] / p1:.2f} phase-1 epochs"),
        ("switch: certificate (safe exploration, auto)", f"{part1['certificate']:.3f} s",
         f"{part1['certificate_verdict']} from {part1['certificate_feature_precision']} features"),
        ("switch: certificate with float64 features", f"{part1['certificate_float64']:.3f} s",
         f"{part1['certificate_float64'] / p1:.2f} phase-1 epochs"),
        ("phase-2 epoch, cached features", f"{cached:.4f} s",
         f"{cached / p1:.4f} of phase 1 (target <= {TARGET_PHASE2_OVER_PHASE1})"),
        ("phase-2 epoch, uncached (frozen trunk forward)", f"{uncached:.3f} s",
         f"{uncached / p1:.3f} of phase 1"),
        ("cached / uncached phase-2 epoch", f"{cached / uncached:.4f}", ""),
        ("evaluation pass: phase 1 / phase 2 cached / uncached",
         f"{part1['evaluation_phase1']:.3f} / {part1['evaluation_phase2_cached']:.4f} / "
         f"{part1['evaluation_phase2_uncached']:.3f} s", ""),
        (f"full base run, {args.epochs} epochs", f"{medians['base']:.2f} s",
         ", ".join(f"{s:.2f}" for s in part2["base"])),
    ]
    for method in methods:
        ratio = medians[method] / medians["base"]
        target = f" (target <= {TARGET_EE_OVER_BASE})" if method == "ee" else ""
        rows.append((f"full {method} run, tau0 = 0.6", f"{medians[method]:.2f} s",
                     f"{ratio:.3f} x base{target}; runs " + ", ".join(f"{s:.2f}" for s in part2[method])))
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>22}  {note}")
    verdicts = {"phase2_cached_over_phase1": cached / p1,
                "ee_over_base": medians["ee"] / medians["base"]}
    print(f"\nphase-2/phase-1 {verdicts['phase2_cached_over_phase1']:.4f} "
          f"({'meets' if verdicts['phase2_cached_over_phase1'] <= TARGET_PHASE2_OVER_PHASE1 else 'MISSES'}"
          f" <= {TARGET_PHASE2_OVER_PHASE1}); EE/base {verdicts['ee_over_base']:.3f} "
          f"({'meets' if verdicts['ee_over_base'] <= TARGET_EE_OVER_BASE else 'MISSES'} "
          f"<= {TARGET_EE_OVER_BASE}); load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "part1": part1, "part2": part2,
                                               "ratios": verdicts}, indent=2))


if __name__ == "__main__":
    main()
