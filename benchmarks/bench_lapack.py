"""The certificates' cubic kernels: SciPy's LAPACK/BLAS (global_convergence.linalg.lapack)
against ``torch.linalg`` on the same matrices (docs/performance.md, "Certificates").

For each size: the Cholesky factorisation of an ``n × n`` Gram matrix (``potrf`` against
``torch.linalg.cholesky_ex``) and the triangular solve ``L⁻¹A`` of the shift preconditioner with
``A`` of ``n × (n + 401)`` (``trsm`` against ``torch.linalg.solve_triangular``), float64, on
PyTorch's thread count; least of ``--repeats`` calls after a warm-up, the two alternating.
Ratios within one run are what to compare (the machine load is printed).

Run:  PYTHONPATH=src python benchmarks/bench_lapack.py [--sizes 2000 4000] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from global_convergence.allocator import keep_freed_memory
from global_convergence.linalg.lapack import cholesky_lower, solve_lower


def least_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The least wall time of each call over ``repeats`` rounds, the calls alternating."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n + 401, generator=g, dtype=torch.float64)
        gram = a @ a.T
        lower = torch.linalg.cholesky(gram)
        chol = least_seconds({"scipy": lambda: cholesky_lower(gram),
                              "torch": lambda: torch.linalg.cholesky_ex(gram)}, args.repeats)
        trsm = least_seconds({
            "scipy": lambda: solve_lower(lower, a),
            "torch": lambda: torch.linalg.solve_triangular(lower, a, upper=False)}, args.repeats)
        for name, t in (("cholesky", chol), (f"trsm x{n + 401}", trsm)):
            print(f"n = {n}: {name:12s} scipy {t['scipy']:.3f} s, torch {t['torch']:.3f} s, "
                  f"scipy / torch = {t['scipy'] / t['torch']:.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
