"""Benchmark of the empirical NTK against neural-tangents and ``torch.func`` (docs/performance.md).

One run measures the rows of the table in docs/performance.md, float32, with flush-to-zero on
(docs/performance.md, "Subnormals"). Each round times ``REPEATS`` calls after one untimed warm-up
call, by the wall clock (median) and by the process's CPU time (``time.process_time``, all
threads; least of the calls); ours and the peer alternate ``--rounds`` times:

* ``ours``  — :func:`global_convergence.ntk.empirical_ntk` (structured per-layer sums);
* ``peer``  — neural-tangents' ``empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES)``,
  jitted, on the same layer sizes written in ``stax`` (:mod:`peer_ntk`), run in a subprocess of
  the optional environment that ``benchmarks/setup_peers.sh`` creates (skipped when it is absent);
* ``vmap(jacrev)`` — the ``torch.func`` tutorial's route: all of ``J`` by ``vmap(jacrev)``, then
  ``J Jᵀ`` (on the ``mlp`` at n = 1000 only: it is the slow one).

Models come from :func:`global_convergence.models.build_model`: the ``mlp`` 2→300→300→300→1 and
LeNet with ``m_c`` = 1 and 4 on 16×16 inputs, one output. Each row also gives the relative
Frobenius error of ours against a float64 reference (the float64 Jacobian route, ``J Jᵀ`` of
``J`` formed in float64, at n ≤ 250; the float64 structured route at n = 1000 — the tests check
the two routes against each other).

Usage::

    bash benchmarks/setup_peers.sh                        # once: creates .venv-peers (optional)
    PYTHONPATH=src python benchmarks/bench_ntk.py         # the table (a few minutes, 2 cores)
    PYTHONPATH=src python benchmarks/bench_ntk.py --rows mlp:1000 --no-reference

The machine load (``os.getloadavg``) is printed: timings on a shared machine are noisy, and ratios
within one run are what to compare. With ``--threads 1`` both libraries run one intra-op thread
(ours: ``torch.set_num_threads``, which :func:`global_convergence.linalg.symmetric.gram` also applies to
NumPy's BLAS; the peer: XLA's flags).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from global_convergence.models import build_model, flush_denormals
from global_convergence.ntk import empirical_ntk

ROWS: tuple[str, ...] = ("mlp:1000", "lenet1:250", "lenet1:1000", "lenet4:250", "lenet4:1000")
"""``model:n`` of the table; ``lenetW`` is LeNet with ``m_c = W``."""
REPEATS = 5
"""Timed calls per round after one warm-up call: the median wall time and the least CPU time."""
JACREV_ROWS = ("mlp:1000",)
"""Rows where ``vmap(jacrev)`` + ``J Jᵀ`` is timed (it needs all of J: 0.7 GB there)."""
PEER_VENV = Path(__file__).resolve().parents[1] / ".venv-peers"
"""The optional environment of ``benchmarks/setup_peers.sh``."""


def model_and_inputs(row: str) -> tuple[nn.Module, Tensor]:
    """The model of a row (seed 0) and its n inputs (uniform in [-1, 1]² or [0, 1]^{16×16})."""
    name, n = row.split(":")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(int(n))
    if name == "mlp":
        return build_model("mlp", (2,), 1), torch.rand(int(n), 2, generator=gen) * 2 - 1
    model = build_model("lenet", (1, 16, 16), 1, width=int(name[len("lenet"):]))
    return model, torch.rand(int(n), 1, 16, 16, generator=gen)


def vmap_jacrev_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """The torch.func tutorial's NTK: all of J by ``vmap(jacrev)``, then ``J Jᵀ``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2)          # (n, m, d)
    J = J.transpose(0, 1).reshape(-1, J.shape[2])
    return J @ J.T


def timed(fn: Callable[[], Tensor], repeats: int = REPEATS) -> tuple[dict[str, float], Tensor]:
    """``{"wall": median, "cpu": least}`` seconds of ``repeats`` calls after one untimed warm-up,
    and the last result."""
    out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": statistics.median(wall), "cpu": min(cpu)}, out


def reference(model: nn.Module, x: Tensor) -> Tensor:
    """float64 NTK: ``J Jᵀ`` from J formed in float64 at n ≤ 250, else float64 structured."""
    method = "jacobian" if x.shape[0] <= 250 else "structured"
    return empirical_ntk(model, x, method=method, dtype=torch.float64)


def rel_err(a: Tensor, ref: Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``ref``."""
    return float((a.double() - ref).norm() / ref.norm())


class Peer:
    """neural-tangents in a subprocess of the peer environment (:mod:`peer_ntk` ``--serve``)."""

    def __init__(self, threads: int | None) -> None:
        python = PEER_VENV / "bin" / "python"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
        if threads is not None:
            env["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
                                f"intra_op_parallelism_threads={threads}")
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).with_name("peer_ntk.py")), "--serve",
             "--repeats", str(REPEATS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env)
        self.versions = self._answer()["versions"]

    def _answer(self) -> dict:
        """The next JSON line of the peer (other lines are library chatter)."""
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError("the peer process ended without an answer")

    def time(self, row: str) -> dict[str, float]:
        self.proc.stdin.write(row + "\n")
        self.proc.stdin.flush()
        return self._answer()[row]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def row_cells(row: str, peer: Peer | None, rounds: int, check: bool) -> str:
    """One line of the table: ours and the peer alternately ``rounds`` times; wall: the medians of
    the rounds, their ratio and the median of the per-round ratios; CPU: the least over all
    rounds and its ratio; then ``vmap(jacrev)`` (wall and CPU of one call) and the error."""
    model, x = model_and_inputs(row)
    d = sum(p.numel() for p in model.parameters())
    ours, theirs = [], []
    for _ in range(rounds):
        if peer is not None:
            theirs.append(peer.time(row))
        t, k = timed(lambda: empirical_ntk(model, x))
        ours.append(t)
    wall = statistics.median(t["wall"] for t in ours)
    cpu = min(t["cpu"] for t in ours)
    cells = [f"{row:>12}", f"{d:>7}", f"{wall:7.4f}"]
    if theirs:
        peer_wall = statistics.median(t["wall"] for t in theirs)
        peer_cpu = min(t["cpu"] for t in theirs)
        per_round = statistics.median(a["wall"] / b["wall"] for a, b in zip(ours, theirs))
        cells += [f"{peer_wall:7.4f}", f"{wall / peer_wall:6.2f}x", f"{per_round:6.2f}x",
                  f"{cpu:7.4f}", f"{peer_cpu:7.4f}", f"{cpu / peer_cpu:6.2f}x"]
    else:
        cells += [f"{'-':>7}", f"{'-':>7}", f"{'-':>7}", f"{cpu:7.4f}", f"{'-':>7}", f"{'-':>7}"]
    if row in JACREV_ROWS:
        t_jac, kj = timed(lambda: vmap_jacrev_ntk(model, x), repeats=1)
        cells += [f"{t_jac['wall']:8.3f}", f"{t_jac['wall'] / wall:7.1f}x",
                  f"{t_jac['cpu'] / cpu:7.1f}x"]
        del kj
    else:
        cells += [f"{'-':>8}", f"{'-':>8}", f"{'-':>8}"]
    cells.append(f"{rel_err(k, reference(model, x)):7.1e}" if check else f"{'-':>7}")
    return " ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="model:n rows")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of ours and the peer per row (wall: medians of the "
                             "rounds; CPU: the least)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of both (default: each library's own)")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 check")
    parser.add_argument("--no-peer", action="store_true", help="skip neural-tangents")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    peer = None
    if not args.no_peer and (PEER_VENV / "bin" / "python").exists():
        peer = Peer(args.threads)
    elif not args.no_peer:
        print(f"(no peer environment at {PEER_VENV}: run benchmarks/setup_peers.sh)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, flush-to-zero, "
          f"{REPEATS} calls per round after a warm-up (wall: median, CPU: least), "
          f"{args.rounds} rounds alternating with the peer"
          + (f"; peer: {peer.versions}" if peer else ""))
    print(f"load {os.getloadavg()[0]:.2f}")
    print(f"{'row':>12} {'d':>7} {'wall':>7} {'peer':>7} {'ratio':>7} {'round':>7} {'cpu':>7} "
          f"{'peer':>7} {'ratio':>7} {'jacrev':>8} {'/wall':>8} {'/cpu':>8} {'err64':>7}")
    print(f"{'':>12} {'':>7} {'s':>7} {'s':>7} {'wall':>7} {'wall':>7} {'s':>7} {'s':>7} "
          f"{'cpu':>7} {'s':>8} {'ours':>8} {'ours':>8}")
    try:
        with flush_denormals():
            for row in args.rows:
                print(row_cells(row, peer, args.rounds, not args.no_reference), flush=True)
    finally:
        if peer is not None:
            peer.close()
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
