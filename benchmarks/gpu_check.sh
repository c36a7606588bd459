#!/usr/bin/env bash
# Every check of this project that needs a GPU, in one go (a few minutes on one H200):
#   1. the whole test suite with CUDA visible (the tests marked "needs CUDA" run too),
#   2. benchmarks/gpu_check.py (CPU against GPU, resume, storage, verifiers, AMP + compile),
#   3. benchmarks/bench_phases.py on CUDA, ResNet-18 on a CIFAR-shaped file (BENCH_N, default
#      10000; BENCH_EPOCHS, BENCH_OPTIONS such as --compile).
# Logs and JSON go to $OUT (default: gpu-check-out/). Uses the python3 on the PATH with its own
# torch; installs this package into it in editable mode without dependencies.
set -u
out=${OUT:-gpu-check-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    echo "editable install failed (see install.log); using PYTHONPATH=src"
    export PYTHONPATH=$PWD/src
fi
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'

workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
timeout "${SUITE_SECONDS:-200}" python3 -m pytest -q -n "$workers" -p no:cacheprovider tests \
    >"$out/suite.log" 2>&1
echo "test suite: exit $?"
grep -E "passed|failed|error" "$out/suite.log" | tail -12

timeout "${CHECK_SECONDS:-200}" python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" \
    2>"$out/gpu_check.err"
echo "gpu_check: exit $?"

n=${BENCH_N:-10000}
data=$(mktemp -d)/cifar-like.npz
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from gpu_check import write_cifar_shaped_npz as w; w(Path('$data'), $n)"
timeout "${BENCH_SECONDS:-180}" python3 benchmarks/bench_phases.py --device cuda --data "$data" \
    --n "$n" --batch-size 128 --epochs "${BENCH_EPOCHS:-4}" --epochs-timed 2 --amp \
    ${BENCH_OPTIONS:-} --json "$out/bench_cuda_n$n.json" 2>"$out/bench_n$n.err"
echo "bench_phases: exit $?"
