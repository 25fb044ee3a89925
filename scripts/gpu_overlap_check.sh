#!/usr/bin/env bash
# One device call for async scheduling: GPU tests, the bench with async scheduling on (with the
# latency figures) and off, and the GPU-idle profile. Logs and result lines go to $OUT.
# Usage on the GPU machine: OUT=/dir NANOVLLM_COMMIT=<sha> scripts/gpu_overlap_check.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout 200 python3 -m pytest tests/gpu -x -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 150 python3 bench.py --ckpt-dir /tmp/ck --results "$OUT/results.jsonl" --note "async" 2>&1 | tail -2 | tee "$OUT/bench.log"
timeout 120 python3 benchmarks/profile_overlap.py --ckpt-dir /tmp/ck --batch 1 256 --steps 40 2>&1 | grep '^{' | tee "$OUT/profile.log"
timeout 100 python3 bench.py --ckpt-dir /tmp/ck --no-async-scheduling --no-latency --results "$OUT/results.jsonl" --note "sync" 2>&1 | tail -2 | tee -a "$OUT/bench.log"
