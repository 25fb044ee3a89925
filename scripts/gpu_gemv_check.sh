#!/usr/bin/env bash
# The decode GEMV (issue 11) in one device call, < 5 min on an H200; logs and result lines go to $OUT
# (append the lines of $OUT/results.jsonl to benchmarks/results.jsonl afterwards).
# Usage on the GPU machine: OUT=/some/dir bash scripts/gpu_gemv_check.sh
#   1. the GEMV's GPU tests (bf16 at the Qwen3-0.6B shapes; the engine's greedy tokens with and
#      without it, eager and CUDA graphs)                                                  ~1 min
#   2. benchmarks/bench_gemv.py --quick: block sizes swept per shape and M, against F.linear;
#      its last lines are a ready-to-paste GEMV_CONFIGS                                  ~1-2 min
#   3. bench.py decode latency at batch 1 / 8 / 64 with NANOVLLM_GEMV=0, then =1 (a small
#      throughput workload first, which bench.py always runs)                             ~2 min
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
CKPT="${CKPT:-/tmp/ck}"
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/device.txt"

timeout 100 "$PY" -m pytest tests/kernels/test_gemv.py tests/gpu/test_gemv_engine_gpu.py -q -p no:cacheprovider -m gpu \
  2>&1 | tail -15 | tee "$OUT/gemv_tests.log"

timeout 120 "$PY" benchmarks/bench_gemv.py "$OUT/results.jsonl" --quick > "$OUT/bench_gemv.log" 2>&1 \
  || echo "bench_gemv.py exited $? (124: timeout)"
grep -v '^#' "$OUT/bench_gemv.log" | cut -c1-400

SMALL="--num-seqs 16 --min-input 100 --max-input 256 --min-output 64 --max-output 128"
for gemv in 0 1; do
  NANOVLLM_GEMV=$gemv timeout 130 "$PY" bench.py --ckpt-dir "$CKPT" --results "$OUT/results.jsonl" $SMALL \
    --note "gemv check: NANOVLLM_GEMV=$gemv (scripts/gpu_gemv_check.sh); baseline: the other setting, same call" \
    > "$OUT/bench_gemv$gemv.log" 2>&1 || echo "bench.py NANOVLLM_GEMV=$gemv exited $? (124: timeout)"
  tail -1 "$OUT/bench_gemv$gemv.log" | "$PY" -c \
    "import json,sys; r=json.loads(sys.stdin.read()); print('NANOVLLM_GEMV=$gemv', {k: v for k, v in r.items() if k.startswith(('decode_ms', 'prefill', 'engine_tok'))})" \
    2>/dev/null || tail -5 "$OUT/bench_gemv$gemv.log"
done
