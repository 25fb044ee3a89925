#!/usr/bin/env bash
# One device call on a two-GPU machine: the GPU tests (tensor-parallel ones included), then the
# reference workload on Qwen3-0.6B shapes at tensor_parallel_size 2 and 1. Logs and result lines go
# to $OUT. Usage on the GPU machine: OUT=/some/dir NANOVLLM_COMMIT=<sha> scripts/gpu_tp_check.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
timeout 220 python3 -m pytest tests/gpu/test_tensor_parallel_gpu.py -q -p no:cacheprovider --durations=5 2>&1 | tail -25 > "$OUT/tp_tests.log"
timeout 150 python3 -m pytest tests/gpu/test_engine_gpu.py -q -p no:cacheprovider --durations=5 2>&1 | tail -25 > "$OUT/gpu_tests.log"
for tp in 2 1; do
  timeout 100 python3 bench.py --no-latency --tensor-parallel-size $tp --results "$OUT/results.jsonl" 2>&1 | tail -8 > "$OUT/bench_tp$tp.log"
done
tail -n 12 "$OUT"/*.log
