#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks; logs and result lines go to $OUT.
# Usage on the GPU machine: OUT=/some/dir scripts/gpu_check.sh [baseline_seqs]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
timeout 200 python3 -m pytest tests/gpu -x -q -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout 240 python3 bench.py --results "$OUT/results.jsonl" ${1:+--baseline hf --baseline-seqs $1} 2>&1 | tail -5 | tee "$OUT/bench.log"
timeout 60 python3 benchmarks/bench_kernels.py 2>&1 | tail -3 | tee "$OUT/bench_kernels.log"
timeout 120 python3 -m pytest tests/kernels -x -q -p no:cacheprovider -k "graph or (decode and 256) or prefill" 2>&1 | tail -5 | tee "$OUT/kernel_tests.log"
