"""Checks that need a CUDA device (CI has none): the GPU paths give what the CPU paths give.

Each check prints one line — ``PASS``/``FAIL``, its name, the figures it compared — and the
script exits 1 if any failed. ``--device cpu`` runs the same code against the CPU twice, a
smoke test of the script itself on a machine without a GPU.

* ``cpu-vs-device``: base, two-phase and EE runs of LeNet on ``random`` (n = 64, τ = 6, alignment
  every 6 steps) on the CPU and on the device: the same switch step, alignment verdicts,
  certificate verdicts and training errors, losses within 1e-4 (relative).
* ``resume``: an EE run interrupted at steps 4 and 9 (before and after τ = 6) and resumed ends
  with the uninterrupted run's parameters, bit for bit, on the device (deterministic kernels).
* ``storage``: two-phase on the device with data in pinned CPU memory and a disk feature cache,
  against data and cache on the device: losses within 1e-5.
* ``verifiers``: the float64 empirical NTK, the alignment verdict, expressivity, safe
  exploration and the EE certificate of LeNet on the device against the CPU.
* ``amp-compile``: an EE run of ResNet-18 on a CIFAR-shaped ``.npz`` (written here) with bf16
  autocast, ``torch.compile`` and channels-last: it finishes with a finite loss and a
  certificate, and its wall-clock is printed.

Usage::

    python benchmarks/gpu_check.py                 # on a machine with CUDA
    python benchmarks/gpu_check.py --device cpu    # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")    # deterministic cuBLAS

import numpy as np
import torch

from global_convergence import conditions
from global_convergence.losses import make_loss
from global_convergence.models import LeNet, ee_model
from global_convergence.ntk import empirical_ntk
from global_convergence.training import CHECKPOINT_NAME, TrainConfig, load_checkpoint, loop, train

LOSS_RTOL = 1e-4
STORAGE_RTOL = 1e-5
TINY = dict(data="random", model="lenet", n=64, steps=12, tau=6, batch_size=16,
            track_alignment_every=6)


def run_figures(config: TrainConfig, out: Path | None) -> dict[str, Any]:
    """The figures two runs of the same config must share: rows, switch, certificate verdict."""
    summary = train(config, out, progress=False)
    rows = loop_rows(out) if out is not None else []
    cert = summary.get("certificate") or {}
    return {"summary": summary, "rows": rows,
            "certificate": (cert.get("condition") or {}).get("verdict")}


def loop_rows(out: Path) -> list[dict[str, str]]:
    import csv
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


def check_cpu_vs_device(device: str, tmp: Path) -> tuple[bool, str]:
    notes, ok = [], True
    for method in ("base", "two-phase", "ee"):
        options = {**TINY, "method": method, "tau": None if method == "base" else TINY["tau"]}
        cpu = run_figures(TrainConfig(**options), tmp / f"cpu-{method}")
        dev = run_figures(TrainConfig(**options, device=device), tmp / f"dev-{method}")
        gap = max(relative_gap(float(a["loss"]), float(b["loss"]))
                  for a, b in zip(dev["rows"], cpu["rows"]))
        same = ([r["alignment_ok"] for r in dev["rows"]] == [r["alignment_ok"] for r in cpu["rows"]]
                and [r["train_error"] for r in dev["rows"]] == [r["train_error"] for r in cpu["rows"]]
                and dev["summary"]["switch_step"] == cpu["summary"]["switch_step"]
                and dev["certificate"] == cpu["certificate"])
        ok &= same and gap <= LOSS_RTOL and len(dev["rows"]) == len(cpu["rows"])
        notes.append(f"{method}: max loss gap {gap:.1e}, verdicts/errors/switch "
                     f"{'equal' if same else 'DIFFER'}, certificate {dev['certificate']}")
    return ok, "; ".join(notes)


def check_resume(device: str, tmp: Path) -> tuple[bool, str]:
    torch.use_deterministic_algorithms(True)
    try:
        config = TrainConfig(**TINY, method="ee", device=device)
        train(config, tmp / "whole", progress=False)
        for stop in (4, 9):
            out = tmp / f"stop{stop}"
            train(config, out, progress=False, stop_after=stop)
            train(config, out, progress=False, resume=True)
        reference = load_checkpoint(tmp / "whole" / CHECKPOINT_NAME)["model"]
        gaps = {}
        for stop in (4, 9):
            state = load_checkpoint(tmp / f"stop{stop}" / CHECKPOINT_NAME)["model"]
            gaps[stop] = max(float((state[k].double() - reference[k].double()).abs().max())
                             for k in reference if reference[k].is_floating_point())
    finally:
        torch.use_deterministic_algorithms(False)
    return all(g == 0.0 for g in gaps.values()), \
        ", ".join(f"stopped at {s}: max parameter gap {g:.1e}" for s, g in gaps.items())


def check_storage(device: str, tmp: Path) -> tuple[bool, str]:
    options = {**TINY, "method": "two-phase", "device": device, "track_alignment_every": None}
    on = run_figures(TrainConfig(**options, data_on_device="yes", feature_cache="memory"), tmp / "on")
    off = run_figures(TrainConfig(**options, data_on_device="no", feature_cache="disk"), tmp / "off")
    gap = max(relative_gap(float(a["loss"]), float(b["loss"])) for a, b in zip(off["rows"], on["rows"]))
    pinned = None
    if device == "cuda":
        run = loop.build_run(TrainConfig(**options, data_on_device="no"))
        pinned = run.x.device.type == "cpu" and run.x.is_pinned()
    ok = gap <= STORAGE_RTOL and pinned is not False and len(on["rows"]) == len(off["rows"])
    return ok, f"pinned+disk vs device+memory: max loss gap {gap:.1e}, inputs pinned {pinned}"


def check_verifiers(device: str, tmp: Path) -> tuple[bool, str]:
    torch.manual_seed(0)
    model = ee_model(LeNet(1, 3), 48)
    x = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))
    loss = make_loss("ce", 3)
    here = copy.deepcopy(model).to(device)
    xd = x.to(device)
    ntk_cpu = empirical_ntk(model, x, dtype=torch.float64)
    ntk_dev = empirical_ntk(here, xd, dtype=torch.float64).cpu()
    ntk_gap = float((ntk_dev - ntk_cpu).abs().max() / ntk_cpu.abs().max())
    a_cpu, a_dev = conditions.alignment(model, x, y, loss=loss), conditions.alignment(here, xd, y.to(device), loss=loss)
    e_cpu, e_dev = conditions.expressivity(model, x), conditions.expressivity(here, xd)
    s_cpu, s_dev = conditions.safe_exploration(model, x), conditions.safe_exploration(here, xd)
    frozen, frozen_dev = copy.deepcopy(model), copy.deepcopy(here)
    for m in (frozen, frozen_dev):
        m.freeze_trunk()
        m.head.freeze_gates()
    facts = dict(full_batch=True, momentum=0.0, weight_decay=0.0, optimizer_name="sgd",
                 lr_used=1e-4, precision="float64")
    c_cpu = conditions.ee_certificate(frozen, x, loss, **facts)
    c_dev = conditions.ee_certificate(frozen_dev, xd, loss, **facts)
    l_gap = relative_gap(c_dev["constants"]["L_hat"], c_cpu["constants"]["L_hat"])
    pairs = {"alignment": (a_cpu, a_dev), "expressivity": (e_cpu, e_dev),
             "safe-exploration": (s_cpu, s_dev)}
    same = all(a.verdict == b.verdict and a.rank == b.rank for a, b in pairs.values())
    same &= c_dev["condition"]["verdict"] == c_cpu["condition"]["verdict"]
    ok = same and ntk_gap <= 1e-10 and l_gap <= 1e-10
    verdicts = ", ".join(f"{k} {b.verdict} rank {b.rank}" for k, (_, b) in pairs.items())
    return ok, (f"NTK relative gap {ntk_gap:.1e}; {verdicts} ({'as' if same else 'NOT as'} on "
                f"the CPU); certificate {c_dev['condition']['verdict']}, L_hat gap {l_gap:.1e}")


def write_cifar_shaped_npz(path: Path, n: int, seed: int = 0) -> None:
    """``n`` 3×32×32 images in 10 classes: a fixed random pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((10, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = patterns[y] + 2.0 * rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    np.savez(path, x=x, y=y)


def check_amp_compile(device: str, tmp: Path) -> tuple[bool, str]:
    path = tmp / "cifar-like.npz"
    write_cifar_shaped_npz(path, 2048)
    config = TrainConfig(data=str(path), model="resnet18", method="ee", epochs=3, tau0=0.6,
                         batch_size=128, lr=0.05, device=device, amp=device == "cuda",
                         compile=device == "cuda", channels_last=True, feature_cache="disk")
    started = time.perf_counter()
    summary = train(config, tmp / "amp", progress=False)
    seconds = time.perf_counter() - started
    cert = summary["certificate"]["condition"]
    ok = summary["completed"] and np.isfinite(summary["train_loss"]) and cert["verdict"] is not None
    return ok, (f"ResNet-18 n=2048 3 epochs amp+compile+channels-last: {seconds:.1f} s, loss "
                f"{summary['train_loss']:.3f}, train error {summary['train_error']:.3f}, "
                f"certificate {cert['verdict']} from {cert.get('feature_precision')} features")


CHECKS: dict[str, Callable[[str, Path], tuple[bool, str]]] = {
    "cpu-vs-device": check_cpu_vs_device, "resume": check_resume, "storage": check_storage,
    "verifiers": check_verifiers, "amp-compile": check_amp_compile}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke test")
        return 2
    loop.plot_run = lambda *a, **k: []
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    results, failed = {}, 0
    for name in args.only or CHECKS:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ok, detail = CHECKS[name](args.device, Path(tmp))
            except Exception as exc:             # a crash is a failed check, the others still run
                ok, detail = False, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        failed += not ok
        results[name] = {"ok": ok, "detail": detail, "seconds": seconds}
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s): {detail}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
