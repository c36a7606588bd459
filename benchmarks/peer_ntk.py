"""neural-tangents' structured empirical NTK on the rows of benchmarks/bench_ntk.py.

Runs inside the optional peer environment (``benchmarks/setup_peers.sh``), not the project's: it
imports jax and neural-tangents only. The layer sizes are those of the library's models
(docs/performance.md): the ``mlp`` 2→300→300→300→1 and LeNet (``8·m_c`` filters of 5×5, the
first padded, 2×2 average pooling, ``128·m_c`` hidden units, one output), softplus with β = 100,
written in ``stax``. ``nt.empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES)``, jitted,
float32; for each row ``--repeats`` calls after one warm-up (compilation) call, each timed by the
wall clock and by the process's CPU time (``time.process_time``, all of its threads). Prints one
JSON line ``{"row": {"wall": median wall seconds, "cpu": least CPU seconds}, ..., "versions":
"..."}``.

Usage (bench_ntk.py runs it with ``--serve``, one row at a time, between its own rows)::

    .venv-peers/bin/python benchmarks/peer_ntk.py mlp:1000 lenet1:250
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import neural_tangents as nt
from neural_tangents import stax

from neural_tangents._src import empirical as _nt_empirical

if not hasattr(_nt_empirical.ad, "source_info_util"):
    # neural-tangents 0.6.5 reaches jax internals (source_info_util, config.jax_enable_checks)
    # through jax.interpreters.ad, which jax 0.4.30 no longer re-exports; hand it jax's internal
    # module with the public config object.
    import types

    from jax._src.interpreters import ad as _jax_ad

    class _AdShim(types.ModuleType):
        config = jax.config

        def __getattr__(self, name: str):
            return getattr(_jax_ad, name)

    _nt_empirical.ad = _AdShim("ad")


BETA = 100.0


def softplus() -> tuple:
    """softplus(β z)/β as a stax layer (only its apply function is used by the empirical NTK)."""
    return stax.Elementwise(fn=lambda z: jax.nn.softplus(BETA * z) / BETA)


def network(name: str) -> tuple:
    """``(init_fn, apply_fn, input shape of one sample)`` of a row's model, NHWC images."""
    if name == "mlp":
        layers = [stax.Dense(300), softplus(), stax.Dense(300), softplus(), stax.Dense(300),
                  softplus(), stax.Dense(1)]
        return (*stax.serial(*layers)[:2], (2,))
    width = int(name[len("lenet"):])
    filters, units = 8 * width, 128 * width
    layers = [stax.Conv(filters, (5, 5), padding="SAME"), softplus(),
              stax.AvgPool((2, 2), (2, 2)), stax.Conv(filters, (5, 5), padding="VALID"),
              softplus(), stax.AvgPool((2, 2), (2, 2)), stax.Flatten(), stax.Dense(units),
              softplus(), stax.Dense(units), softplus(), stax.Dense(1)]
    return (*stax.serial(*layers)[:2], (16, 16, 1))


_PREPARED: dict[str, tuple] = {}


def prepared(row: str) -> tuple:
    """``(jitted NTK function, x, params)`` of a row, built once per process."""
    if row not in _PREPARED:
        name, n = row.split(":")
        init_fn, apply_fn, shape = network(name)
        _, params = init_fn(jax.random.PRNGKey(0), (-1, *shape))
        x = jax.random.uniform(jax.random.PRNGKey(int(n)), (int(n), *shape), jnp.float32)
        impl = nt.NtkImplementation.STRUCTURED_DERIVATIVES
        fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                                         implementation=impl))
        _PREPARED[row] = (fn, x, params)
    return _PREPARED[row]


def time_row(row: str, repeats: int) -> dict[str, float]:
    """Median wall seconds and least CPU seconds of the jitted structured NTK of one row, over
    ``repeats`` calls after one warm-up call."""
    fn, x, params = prepared(row)
    fn(x, None, params).block_until_ready()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x, None, params).block_until_ready()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": statistics.median(wall), "cpu": min(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", action="store_true",
                        help="read one row per line from stdin, answer one JSON line each")
    args = parser.parse_args()
    versions = f"jax {jax.__version__}, neural-tangents {nt.__version__}, {jax.devices()}"
    if args.serve:
        print(json.dumps({"versions": versions}), flush=True)
        for line in sys.stdin:
            row = line.strip()
            print(json.dumps({row: time_row(row, args.repeats)}), flush=True)
        return
    result: dict[str, object] = {row: time_row(row, args.repeats) for row in args.rows}
    result["versions"] = versions
    print(json.dumps(result))


if __name__ == "__main__":
    main()
