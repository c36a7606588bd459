"""Benchmark: the Gram certificate on N gloo ranks against one process (docs/verifiers.md).

For a well-conditioned Khatri-Rao ``ϕ`` ([K22] §3.3.1; ``m_H = 32``, ``m_{H−1}`` just enough for
``cols ≥ n``) at each n, in one run:

* ``ranks``   — :func:`distributed_factor_rank_verdict` on ``--world`` processes (gloo, a file
  store, one intra-op thread each), the slowest rank's wall time of the call (start-up excluded),
  and the fraction of it each rank spent waiting for panels;
* ``1p-blocked-1t`` — :func:`factor_rank_verdict` in this process with the same block width and
  one intra-op thread (the work of one rank's core, done alone);
* ``1p-blocked`` — the same with ``--world`` intra-op threads (the same cores as the ranks);
* ``1p-default`` — that with the default layout (the dense Gram below 2 GiB);

with the verdicts, which must coincide. The machine load (``os.getloadavg``) is printed: on a
shared machine the ratios are what to read.

Usage::

    PYTHONPATH=src python benchmarks/bench_distributed_cholesky.py --n 480 4000 8000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def khatri_rao(n: int, seed: int = 0):
    from global_convergence.linalg import KhatriRaoFactor
    g = torch.Generator().manual_seed(seed)
    m_s = 32
    m_z = math.ceil(n / m_s) + 8
    return KhatriRaoFactor(torch.randn(n, m_s, generator=g, dtype=torch.float64),
                           torch.randn(n, m_z, generator=g, dtype=torch.float64))


def rank_main(rank: int, world: int, root: str, n: int, block: int | None) -> None:
    """One rank: join the group, decide, write its wall time and verdict."""
    import torch.distributed as dist
    from global_convergence.linalg.distributed_rank import distributed_factor_rank_verdict
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank,
                            world_size=world)
    factor = khatri_rao(n)
    dist.barrier()
    start = time.perf_counter()
    verdict = distributed_factor_rank_verdict(factor, block=block)
    seconds = time.perf_counter() - start
    Path(root, f"rank{rank}.json").write_text(json.dumps(
        {"seconds": seconds, "wait": verdict.seconds.get("cholesky_wait", 0.0),
         "verdict": verdict.verdict, "margin": verdict.details.get("margin"),
         "block": verdict.details.get("cholesky_block"),
         "bytes": verdict.details.get("cholesky_bytes_per_rank")}))
    dist.destroy_process_group()


def on_ranks(n: int, world: int, block: int | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world",
                                   str(world), "--root", root, "--n", str(n)]
                                  + (["--block", str(block)] if block else []), env=env)
                 for r in range(world)]
        codes = [p.wait(timeout=3600) for p in procs]
        if any(codes):
            raise RuntimeError(f"a rank failed: {codes}")
        return [json.loads(Path(root, f"rank{r}.json").read_text()) for r in range(world)]


def one_process(n: int, threads: int, block: int | None) -> tuple[float, object]:
    from global_convergence.linalg import factor_rank_verdict
    torch.set_num_threads(threads)
    factor = khatri_rao(n)
    start = time.perf_counter()
    verdict = factor_rank_verdict(factor, block=block)
    return time.perf_counter() - start, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[480, 4000, 8000])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--block", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.world, args.root, args.n[0], args.block)
        return
    from global_convergence.linalg.distributed_rank import default_block
    print(f"load average before: {os.getloadavg()}")
    print(f"{'n':>6} {'block':>6} {'ranks s':>8} {'1p-blocked-1t s':>16} {'1p-blocked s':>13} "
          f"{'1p-default s':>13} {'ranks/1t':>9} {'ranks/blocked':>14} {'ranks/default':>14}"
          "  verdicts")
    for n in args.n:
        block = args.block or default_block(n, args.world)
        ranks = on_ranks(n, args.world, block)
        t_ranks = max(r["seconds"] for r in ranks)
        t_single, single = one_process(n, 1, block)
        t_blocked, blocked = one_process(n, args.world, block)
        t_default, default = one_process(n, args.world, None)
        words = {r["verdict"] for r in ranks} | {v.verdict for v in (single, blocked, default)}
        print(f"{n:>6} {block:>6} {t_ranks:>8.2f} {t_single:>16.2f} {t_blocked:>13.2f} "
              f"{t_default:>13.2f} {t_ranks / t_single:>9.2f} {t_ranks / t_blocked:>14.2f} "
              f"{t_ranks / t_default:>14.2f}  {sorted(words)} "
              f"margin {ranks[0]['margin']:.3g} / {blocked.details['margin']:.3g}; "
              f"bytes per rank {ranks[0]['bytes']}; waiting for panels "
              f"{[round(r['wait'] / r['seconds'], 3) for r in ranks]} of each rank's time",
              flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
