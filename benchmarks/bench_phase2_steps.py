"""Benchmark of the second phase's steps: the autograd step on cached features against the exact
coefficient-space steps of :mod:`global_convergence.training.kernel_steps`.

One run of this script measures both on the same machine state and prints their ratio against
the target (at least 10× the autograd step's rate on the sine job of [K22] §3.4.1: the ``mlp``,
n = 100, full-batch GD). Each is driven the way ``gconv train``'s loop drives it: the autograd
step one ``train_step`` at a time; the engine a block of steps per call (``phase2_block``, up to
the next step the loop logs at, every ``--log-every`` steps) followed by the write-back of the
weights the loop's evaluation at that step starts with (``sync_model``). The evaluation itself
costs both paths the same and is not timed. For each method (EE with G̃ = G, two-phase) it:

1. builds the run, takes ``--tau`` phase-1 steps, switches (perturbation, feature cache, engine);
2. alternates stretches of autograd steps (the engine detached), of engine steps taken one per
   ``train_step`` call (for comparison) and of engine blocks, ``--repeats`` times, and reports
   the medians of steps per second; the verdict is on the blocks' rate;
3. times the engine's set-up (the kernel) and one write-back of the weights.

Usage::

    python benchmarks/bench_phase2_steps.py                 # sine, n = 100, 1 thread
    python benchmarks/bench_phase2_steps.py --n 1000 --batch-size 64 --momentum 0.9

Runs with float32 subnormals flushed (softplus(100), docs/performance.md). The machine load
(``os.getloadavg``) is printed before and after: on a shared machine absolute rates are noisy,
the ratio within one run less so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from global_convergence.models import flush_denormals
from global_convergence.training import TrainConfig, build_run, loop
from global_convergence.training.kernel_steps import kernel_steps_for
from global_convergence.training.phase2 import phase2_block

TARGET_RATIO = 10.0


def switched_run(args: argparse.Namespace, method: str) -> loop.Run:
    """A run of ``method`` just after its switch, phase 2 set up as ``gconv train`` does."""
    config = TrainConfig(data=args.data, model="mlp", method=method, n=args.n, seed=0,
                         optimizer="sgd", lr=args.lr, momentum=args.momentum, weight_decay=0.0,
                         batch_size=args.batch_size, steps=args.tau + 10 ** 7, tau=args.tau,
                         eps=0.01, delta0=1e-3)
    run = build_run(config)
    loop.attach_train_module(run)
    while run.phase == 1:
        loop.train_step(run)
        run.step += 1
    loop.enter_phase2(run)
    return run


def rate(run: loop.Run, steps: int) -> float:
    """Steps per second of ``steps`` calls of the loop's ``train_step`` (the autograd step)."""
    started = time.perf_counter()
    for _ in range(steps):
        loop.train_step(run)
        run.step += 1
    return steps / (time.perf_counter() - started)


def block_rate(run: loop.Run, steps: int, block: int) -> float:
    """Steps per second of ``steps`` engine steps in blocks of ``block``, each followed by the
    write-back that precedes the loop's evaluation."""
    started = time.perf_counter()
    for _ in range(steps // block):
        phase2_block(run, block)
        run.step += block
        loop.sync_model(run)
    return steps // block * block / (time.perf_counter() - started)


def measure(args: argparse.Namespace, method: str) -> dict[str, float]:
    run = switched_run(args, method)
    started = time.perf_counter()
    engine = kernel_steps_for(run)
    setup = time.perf_counter() - started
    if engine is None:
        raise SystemExit(f"{method}: the coefficient-space step does not apply to this run")
    run.kernel = engine
    slow, single, fast = [], [], []
    for _ in range(args.repeats):
        run.kernel = None                 # the autograd step on cached features
        slow.append(rate(run, args.autograd_steps))
        run.kernel = engine
        engine.write_back()               # the parameters the autograd step reads are the engine's
        single.append(rate(run, args.autograd_steps))           # one engine step per train_step
        fast.append(block_rate(run, args.engine_steps, args.log_every))
    started = time.perf_counter()
    engine.write_back()
    write_back = time.perf_counter() - started
    autograd, one, kernel = (statistics.median(v) for v in (slow, single, fast))
    return {"autograd_steps_per_s": autograd, "kernel_single_steps_per_s": one,
            "kernel_steps_per_s": kernel, "ratio": kernel / autograd, "single_ratio": one / autograd,
            "kernel_setup_s": setup, "write_back_s": write_back}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="sine")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=0, help="0: full batch")
    parser.add_argument("--tau", type=int, default=20, help="phase-1 steps before the switch")
    parser.add_argument("--autograd-steps", type=int, default=200)
    parser.add_argument("--engine-steps", type=int, default=6000)
    parser.add_argument("--log-every", type=int, default=20,
                        help="steps per engine block (the demo logs every 20 steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; threads {args.threads}")
    results = {}
    with flush_denormals(True):
        for method in ("ee", "two-phase"):
            results[method] = measure(args, method)
            r = results[method]
            verdict = "meets" if r["ratio"] >= TARGET_RATIO else "misses"
            print(f"{method:>9}: autograd {r['autograd_steps_per_s']:7.0f} steps/s; engine one step "
                  f"per call {r['kernel_single_steps_per_s']:7.0f} steps/s ({r['single_ratio']:.1f}×), "
                  f"in blocks of {args.log_every} {r['kernel_steps_per_s']:7.0f} steps/s, ratio "
                  f"{r['ratio']:5.1f}× ({verdict} the {TARGET_RATIO:.0f}× target); kernel set-up "
                  f"{r['kernel_setup_s'] * 1e3:.1f} ms, write-back {r['write_back_s'] * 1e3:.2f} ms")
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps({"settings": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
