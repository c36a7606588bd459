"""Safe-exploration rank decision vs the paper's dense ``numpy.linalg.matrix_rank`` (docs/verifiers.md).

Measures, in one run:

1. at ``n`` (default 4000) with ``ϕ`` of ``n × m_H·m_{H−1}`` (default 16 × 513 = 8208 columns):
   seconds of dense ``numpy.linalg.matrix_rank(ϕ)`` (the paper's method; the reference figure
   is in docs/verifiers.md, "Benchmark") against
   :func:`global_convergence.conditions.safe_exploration`'s rank decision (its JSON
   ``seconds.rank``), their ratio and both verdicts / ranks and the margin;
2. in a fresh subprocess each (so ``ru_maxrss`` is its own peak): time and peak memory of a
   verdict at each ``--large-n`` (default 60,000, ``m_H = ⌈2n/513⌉`` as in [K22] §3.4), where the
   Gram matrix no longer fits densely and the blocked Cholesky over panels rebuilt from ``Z`` and
   ``S`` runs.

Features: a fixed random "ResNet-like" map (standing in for ResNet-18 features, docs/verifiers.md): inputs with 64
latent dimensions through two He-initialised softplus(β=100) layers (1024, then 512 units), so
``z̄ ≥ 0`` with a dominant common mode, plus the constant neuron; ``q ~ N(0, 1)`` as in the paper.
Everything is float64; flush-to-zero is on (float64 features have no subnormals here either way).

Run:  python benchmarks/bench_rank.py                 # both parts (the large n takes long)
      python benchmarks/bench_rank.py --large-n 0     # part 1 only
      python benchmarks/bench_rank.py --skip-dense --large-n 20000 40000
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from global_convergence.conditions import safe_exploration
from global_convergence.conditions.safe_exploration import gate_matrices, gate_values
from global_convergence.linalg import KhatriRaoFactor
from global_convergence.models import EEModel, flush_denormals
from global_convergence.models.heads import GatedHead

TRUNK_FEATURES = 512
"""``z̄`` dimension (ResNet-18's pooled features); ``m_{H−1} = 513`` with the constant neuron."""
LATENT = 64
HIDDEN = 1024


def resnet_like_features(n: int, seed: int = 0) -> torch.Tensor:
    """``z̄`` (n × 512): softplus(β=100) features of a random two-layer He-initialised map."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
    w1 = torch.randn(LATENT, HIDDEN, generator=g, dtype=torch.float64) * math.sqrt(2 / LATENT)
    w2 = torch.randn(HIDDEN, TRUNK_FEATURES, generator=g, dtype=torch.float64) \
        * math.sqrt(2 / HIDDEN)
    out = torch.empty(n, TRUNK_FEATURES, dtype=torch.float64)
    for s in range(0, n, 8192):
        out[s:s + 8192] = F.softplus(F.softplus(latent[s:s + 8192] @ w1, beta=100) @ w2, beta=100)
    return out


def ee_identity_model(width: int) -> EEModel:
    """An EE model whose trunk is the identity: its input *is* ``z̄``."""
    return EEModel(nn.Identity(), GatedHead(TRUNK_FEATURES, width, 1))


def verdict_at(n: int, width: int, seed: int) -> dict:
    """Features, then the safe-exploration verdict with ``q = "random"``; figures as a dict."""
    start = time.perf_counter()
    z_bar = resnet_like_features(n, seed)
    generated = time.perf_counter() - start
    model = ee_identity_model(width)
    with flush_denormals():
        verdict = safe_exploration(model, z_bar, q="random", seed=seed)
    d = verdict.to_dict()
    return {"n": n, "m_H": width, "shape": d["shape"], "verdict": d["verdict"],
            "rank": d["rank"], "margin": d.get("margin"), "route": d.get("route"),
            "cholesky_layout": d.get("cholesky_layout"), "seconds_rank": d["seconds"]["rank"],
            "seconds_features": d["seconds"]["features"], "seconds_generate": generated,
            "smallest_kept": d["smallest_kept"], "tolerance": d["tolerance"],
            "certified_sigma_min_lower_bound": d.get("certified_sigma_min_lower_bound")}


def dense_matrix_rank(n: int, width: int, seed: int) -> dict:
    """The paper's method: build ϕ densely (same features and q), ``numpy.linalg.matrix_rank``."""
    z_bar = resnet_like_features(n, seed)
    head = ee_identity_model(width).head
    z = head.augmented_input(z_bar)
    (_, q), = gate_matrices(head, "random", seed, torch.float64, z.device)[0]
    phi = KhatriRaoFactor(gate_values(z, q, head.gate_sharpness), z).dense().numpy()
    start = time.perf_counter()
    rank = int(np.linalg.matrix_rank(phi))
    return {"rank": rank, "seconds": time.perf_counter() - start, "shape": list(phi.shape)}


def large_in_subprocess(n: int, seed: int) -> dict:
    """:func:`verdict_at` for ``m_H = ⌈2n/513⌉`` in a fresh process; adds its peak RSS."""
    width = math.ceil(2 * n / (TRUNK_FEATURES + 1))
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(width), str(seed)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"n": n, "m_H": width, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(n: int, width: int, seed: int) -> None:
    result = verdict_at(n, width, seed)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--m-h", type=int, default=16)
    parser.add_argument("--large-n", type=int, nargs="*", default=[60000])
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, flush-to-zero on, "
          "float64")
    ours = verdict_at(args.n, args.m_h, args.seed)
    print(f"n={args.n}, phi {ours['shape'][0]} x {ours['shape'][1]}:")
    print(f"  safe_exploration: verdict {ours['verdict']}, rank {ours['rank']}, route "
          f"{ours['route']}, margin sigma_min/tol >= {ours['margin']:.3g}, "
          f"seconds.rank {ours['seconds_rank']:.2f} s")
    if not args.skip_dense:
        dense = dense_matrix_rank(args.n, args.m_h, args.seed)
        print(f"  numpy.linalg.matrix_rank(phi): rank {dense['rank']}, {dense['seconds']:.1f} s "
              "(reference: 18.6 s on a faster machine)")
        print(f"  speed-up: {dense['seconds'] / ours['seconds_rank']:.1f}x (target >= 20x)")
    for n in [n for n in args.large_n if n > 0]:
        r = large_in_subprocess(n, args.seed)
        if "error" in r:
            print(f"n={n}: failed: {r['error']}")
            continue
        print(f"n={n}, phi {r['shape'][0]} x {r['shape'][1]} (m_H={r['m_H']}): verdict "
              f"{r['verdict']}, rank {r['rank']}, layout {r['cholesky_layout']}, "
              f"seconds.rank {r['seconds_rank']:.0f} s, peak RSS {r['peak_rss_gib']:.1f} GiB, "
              f"margin >= {r['margin']:.3g}")
        print("  " + json.dumps(r))


if __name__ == "__main__":
    main()
