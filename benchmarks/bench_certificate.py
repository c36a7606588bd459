"""What a certificate costs against the training it certifies, and the ResNet-18 check at
initialisation against the paper's ``numpy.linalg.matrix_rank`` (docs/verifiers.md "Cost").

One run, ratios printed (the machine is shared: compare ratios, not seconds):

1. the ``mlp`` job: a generated 10-class, 784-feature ``.npz`` (4,000 train + 1,000 test,
   pixel-like values in [0, 1]); ``gconv train --model mlp --epochs 20 --batch-size 64`` with
   ``--method base``, ``two-phase`` and ``ee`` through :func:`global_convergence.training.train`.
   Prints the whole base run, each switch (``seconds.switch``, the certificate included), the
   certificate's verdict, route and margin. Targets: both decided, the EE switch ≤ 1.5× the base
   run, the two-phase switch ≤ 1× the base run.
2. ResNet-18 on 4,000 random 3×16×16 images: ``gconv verify safe-exploration`` (He
   initialisation, ``q ~ N(0, 1)``, batch-norm statistics recomputed over the inputs) — verdict,
   ``seconds.rank`` — against ``numpy.linalg.matrix_rank`` of a ϕ of the same shape: timed on
   ``--dense-rows`` rows and scaled by its ``O(n²·cols)`` cost when that is fewer than n (said in
   the output). Target: verified, ≥ 20× faster.

The process keeps freed memory for reuse as ``gconv`` does (``--allocator default``: not).

Run:  python benchmarks/bench_certificate.py [--skip-train] [--skip-resnet] [--dense-rows 4000]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from global_convergence.allocator import keep_freed_memory
from global_convergence.experiments.verify import verify
from global_convergence.models import flush_denormals
from global_convergence.training import TrainConfig, train


def mlp_job(folder: Path, n: int = 4000, n_test: int = 1000, seed: int = 0) -> Path:
    """The item's data: 10 classes of 784 pixel-like features around random class means."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((10, 784)).astype(np.float32)

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, k)
        x = np.clip(0.3 + 0.15 * (means[y] + rng.standard_normal((k, 784))), 0, 1)
        return x.astype(np.float32), y

    (x, y), (xt, yt) = draw(n), draw(n_test)
    path = folder / "mlp10.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return path


def random_images(folder: Path, n: int = 4000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path = folder / "random16.npz"
    np.savez(path, x=rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, n))
    return path


def run_method(data: Path, method: str, out: Path, epochs: int) -> dict:
    config = TrainConfig.from_dict({"data": str(data), "model": "mlp", "method": method,
                                    "epochs": epochs, "batch_size": 64})
    start = time.perf_counter()
    summary = train(config, out / method, progress=False)
    summary["wall"] = time.perf_counter() - start
    return summary


def certificate_line(summary: dict) -> str:
    c = (summary.get("certificate") or {}).get("condition") or {}
    return (f"verdict {c.get('verdict')}, route {c.get('route')}, margin "
            f"{c.get('margin') or 0:.3g}, features {c.get('feature_precision')}, "
            f"rank seconds {(c.get('seconds') or {}).get('rank', 0):.2f}")


def part_training(folder: Path, epochs: int) -> None:
    data = mlp_job(folder)
    runs = {m: run_method(data, m, folder, epochs) for m in ("base", "two-phase", "ee")}
    base = runs["base"]["wall"]
    print(f"mlp, 4000 + 1000, 784 features, 10 classes, {epochs} epochs, batch 64:")
    print(f"  base run: {base:.1f} s")
    for method, target in (("two-phase", 1.0), ("ee", 1.5)):
        switch = runs[method]["seconds"]["switch"]
        print(f"  {method}: whole run {runs[method]['wall']:.1f} s, switch {switch:.1f} s = "
              f"{switch / base:.2f}x the base run (target <= {target}x); "
              + certificate_line(runs[method]))


def dense_rank_seconds(z: torch.Tensor, s: torch.Tensor) -> float:
    """``numpy.linalg.matrix_rank`` of the dense ``ϕ`` built from ``s`` and ``z``."""
    phi = (s[:, :, None] * z[:, None, :]).reshape(z.shape[0], -1).numpy()
    start = time.perf_counter()
    np.linalg.matrix_rank(phi)
    return time.perf_counter() - start


def part_resnet(folder: Path, dense_rows: int) -> None:
    data = random_images(folder)
    verdict = verify("safe-exploration", data=str(data), model="resnet18").to_dict()
    n, cols = verdict["shape"]
    seconds = verdict["seconds"]["rank"]
    print(f"resnet18, {n} random 3x16x16 images, phi {n} x {cols}: {verdict['verdict']} "
          f"(route {verdict.get('route')}, margin {verdict.get('margin') or 0:.3g}, batch norm "
          f"{verdict['batchnorm']['statistics']}, features {verdict.get('feature_precision')}); "
          f"seconds.features {verdict['seconds']['features']:.1f}, seconds.rank {seconds:.2f}")
    rows = min(dense_rows, n)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, 513, generator=g, dtype=torch.float64)
    s = torch.rand(rows, cols // 513, generator=g, dtype=torch.float64)
    dense = dense_rank_seconds(z, s) * (n / rows) ** 2
    how = "measured" if rows == n else f"measured on {rows} rows, scaled by (n/rows)^2"
    print(f"  numpy.linalg.matrix_rank of a {n} x {cols} phi: {dense:.1f} s ({how}); "
          f"speed-up {dense / seconds:.1f}x (target >= 20x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dense-rows", type=int, default=4000)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--allocator", choices=("gconv", "default"), default="gconv",
                        help="gconv: keep freed memory for reuse, as the gconv command does "
                             "(global_convergence.allocator); default: glibc's own settings")
    args = parser.parse_args()
    kept = args.allocator == "gconv" and keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}, allocator {'gconv (freed memory kept)' if kept else 'default'}")
    with flush_denormals(), tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            part_training(Path(tmp), args.epochs)
        if not args.skip_resnet:
            part_resnet(Path(tmp), args.dense_rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
