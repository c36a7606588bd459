#!/usr/bin/env bash
# Optional peer environment for benchmarks/bench_ntk.py: neural-tangents on a CPU jax, in its own
# virtual environment (git-ignored) so that it never touches the project's torch environment.
#
#   bash benchmarks/setup_peers.sh            # creates .venv-peers in the repository root
#   PEERS_VENV=/some/dir bash benchmarks/setup_peers.sh
#
# Versions: jax 0.4.30 with its CPU jaxlib and neural-tangents 0.6.5 (the figures in
# docs/performance.md were measured with these). neural-tangents pulls in tensorflow (about
# 600 MB); benchmarks/peer_ntk.py carries a small shim for jax 0.4.30 (see the comment there).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PEERS_VENV:-$root/.venv-peers}"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "jax==0.4.30" "jaxlib==0.4.30" "neural-tangents==0.6.5"
"$venv/bin/python" -c "import jax, neural_tangents as nt; print('jax', jax.__version__, 'neural-tangents', nt.__version__)"
