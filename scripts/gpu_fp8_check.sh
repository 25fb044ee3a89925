#!/usr/bin/env bash
# FP8 KV cache on one GPU (issue 14): one part per device call, each well under 10 minutes. Logs and
# result lines go to $OUT (append the lines of results.jsonl to benchmarks/results.jsonl afterwards).
# Usage on the GPU machine: OUT=/some/dir NANOVLLM_COMMIT=<sha> scripts/gpu_fp8_check.sh PART
#   tests      the fp8 kernel tests at real shapes (Qwen3-0.6B: 16/8 heads, head_dim 128, block 256),
#              CUDA-graph replay with changing scales, and the engine's fp8 GPU test (~3 min)
#   kernels    benchmarks/bench_kernels.py: decode GB/s of fp8 beside bf16, prefill TFLOP/s (~1 min)
#   reference  the reference workload (256 seqs, 100-1024 in / out) at Qwen3-0.6B shapes,
#              kv_cache_dtype auto and fp8 alternating, three runs each; prints the medians (~5 min)
#   long       the long-context case: 64 sequences of 15,000 prompt + 1,000 new tokens (16,000
#              each), max_model_len 32768, auto then fp8; prints max_decode_batch and tok/s (~6 min)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"

summary() {  # median engine tok/s per kv_cache_dtype over the lines of $OUT/results.jsonl with this note
  python3 - "$1" "$OUT/results.jsonl" <<'EOF'
import json, statistics, sys
note, path = sys.argv[1], sys.argv[2]
rows = [r for r in map(json.loads, open(path)) if r.get("note", "").startswith(note)]
med = {}
for kv in ("bfloat16", "float8_e4m3fn"):
    mine = [r for r in rows if r.get("kv_cache_dtype") == kv]
    if mine:
        med[kv] = statistics.median(r["engine_tok_s"] for r in mine)
        print(kv, "tok/s", [r["engine_tok_s"] for r in mine], "median", med[kv],
              "blocks", mine[0]["kv_cache_blocks"], "max_decode_batch", [r["max_decode_batch"] for r in mine],
              "preemptions", [r["num_preemptions"] for r in mine])
if len(med) == 2:
    print("fp8 / auto throughput:", round(med["float8_e4m3fn"] / med["bfloat16"], 3))
EOF
}

case "${1:-tests}" in
  tests)
    timeout 420 python3 -m pytest tests/kernels -q -p no:cacheprovider -k "fp8 or graph" 2>&1 | tail -15 | tee "$OUT/fp8_kernel_tests.log"
    timeout 150 python3 -m pytest tests/test_kv_cache_fp8.py -q -p no:cacheprovider -m gpu 2>&1 | tail -8 | tee "$OUT/fp8_engine_tests.log"
    ;;
  kernels)
    timeout 200 python3 benchmarks/bench_kernels.py "$OUT/results.jsonl" 2>&1 | grep -v '^{' | tee "$OUT/bench_kernels.log"
    ;;
  reference)
    for run in 1 2 3; do
      for kv in auto fp8; do
        timeout 150 python3 bench.py --no-latency --kv-cache-dtype $kv --results "$OUT/results.jsonl" \
          --note "fp8 check reference run $run; baseline: kv_cache_dtype auto in the same device call" 2>&1 | tail -2 > "$OUT/bench_ref_${kv}_$run.log"
      done
    done
    summary "fp8 check reference" | tee "$OUT/reference_summary.txt"
    ;;
  long)
    for kv in auto fp8; do
      timeout 270 python3 bench.py --no-latency --kv-cache-dtype $kv --num-seqs 64 --min-input 15000 --max-input 15000 \
        --min-output 1000 --max-output 1000 --max-model-len 32768 --results "$OUT/results.jsonl" \
        --note "fp8 check long context; baseline: kv_cache_dtype auto in the same device call" 2>&1 | tail -2 > "$OUT/bench_long_$kv.log"
    done
    summary "fp8 check long" | tee "$OUT/long_summary.txt"
    ;;
  *) echo "unknown part $1: tests | kernels | reference | long" >&2; exit 2 ;;
esac
