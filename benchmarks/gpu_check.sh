#!/usr/bin/env bash
# The GPU path in under five minutes on a CUDA machine: the CUDA tests, then benchmarks/gpu_check.py
# (training tokens/s and MFU in bf16 and fp32, sampling samples/s, peak memory, the paper-scale
# preset's step time, a 2-minute training run sampled and scored). Writes benchmarks/results/gpu.md.
#   bash benchmarks/gpu_check.sh [OUT.md]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu.md}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py; tests=$?
timeout 420 python3 benchmarks/gpu_check.py --out "$out"; check=$?
echo "cuda tests rc=$tests, gpu_check rc=$check"
exit $(( tests || check ))
