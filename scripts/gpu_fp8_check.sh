#!/usr/bin/env bash
# FP8 KV cache on one GPU (issue 14). Logs and result lines go to $OUT (append the lines of
# $OUT/results.jsonl to benchmarks/results.jsonl afterwards).
# Usage on the GPU machine: OUT=/some/dir NANOVLLM_COMMIT=<sha> scripts/gpu_fp8_check.sh [PART]
#   all        (default) kernels, then long and reference in one process: one device call, < 8 min
#   kernels    benchmarks/bench_kernels.py: decode GB/s of fp8 beside bf16, prefill TFLOP/s (~1 min)
#   reference  the reference workload (256 seqs, 100-1024 in / out) at Qwen3-0.6B shapes with random
#              bf16 weights, kv_cache_dtype auto and fp8 alternating, three runs each; medians (~3 min)
#   long       64 sequences of 16,000-token prompts + 512 new tokens, max_model_len 32768, auto then
#              fp8: sequences running at once, KV blocks, tok/s (~2 min)
#   tests      the fp8 kernel tests at real shapes, CUDA-graph replay with changing scales, and the
#              engine's fp8 GPU test (~3 min; a call of its own)
#   warps      the warp_split option (kernels/decode_attention.py) against the shipped launch at one
#              layer, bench_decode_launch.py, then its GPU tests at real shapes (~3 min)
#   store      the cost of the fp8 V store: benchmarks/bench_v_store.py by layout (reading a sector
#              before writing a byte of it, or prefetching it to L2), then qkv_prep alone three rounds,
#              alternating with the tree in $OLD if set (labelled $OLD_COMMIT), then qkv_prep's and
#              the store's GPU tests (~3 min)
#   ab         the reference workload, this tree against the tree in $OLD (labelled $OLD_COMMIT): one
#              process per tree and round (auto then fp8), in turn, three rounds; medians and fp8/auto
#              per tree (~6 min: a call of its own)
# Dry run on a CPU (tiny model and sizes, the kernel benchmark only imported):
#   NANOVLLM_FP8_TINY=1 PYTHON=.venv/bin/python OUT=/tmp/fp8dry scripts/gpu_fp8_check.sh all
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
NOTE="fp8 check (scripts/gpu_fp8_check.sh); baseline: kv_cache_dtype auto in the same device call"
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/device.txt"

kernels() {
  if [ "${NANOVLLM_FP8_TINY:-0}" = 1 ]; then  # no CUDA here: check that it imports
    timeout 60 "$PY" -c "import benchmarks.bench_kernels as b; print('bench_kernels imports:', b.main.__name__)" \
      2>&1 | tee "$OUT/bench_kernels.log"
  else
    timeout 90 "$PY" benchmarks/bench_kernels.py "$OUT/results.jsonl" 2>&1 | grep -v '^{' | tee "$OUT/bench_kernels.log"
  fi
}

engine_bench() {  # $1: seconds allowed, then the parts; every run's line reaches results.jsonl at once
  local limit=$1 log="$OUT/bench_fp8_$2.log" rc; shift
  timeout "$limit" "$PY" benchmarks/bench_fp8.py --parts "$@" --results "$OUT/results.jsonl" --note "$NOTE" \
    > "$log" 2>&1; rc=$?
  grep -E '^(reference|long) ' "$log"
  [ "$rc" = 0 ] || { echo "bench_fp8.py exited $rc (124: timeout); its last lines:"; tail -15 "$log"; }
  "$PY" benchmarks/bench_fp8.py --summarize "$OUT/results.jsonl" | tee "$OUT/fp8_summary.json"
}

case "${1:-all}" in
  all)
    kernels
    engine_bench 370 long reference
    ;;
  kernels) kernels ;;
  reference) engine_bench 300 reference ;;
  long) engine_bench 240 long ;;
  tests)
    timeout 420 "$PY" -m pytest tests/kernels -q -p no:cacheprovider -k "fp8 or graph" 2>&1 | tail -15 | tee "$OUT/fp8_kernel_tests.log"
    timeout 150 "$PY" -m pytest tests/test_kv_cache_fp8.py -q -p no:cacheprovider -m gpu 2>&1 | tail -8 | tee "$OUT/fp8_engine_tests.log"
    ;;
  warps)
    timeout 300 "$PY" benchmarks/bench_decode_launch.py 128,5 128,5:ws 128,4:ws 128,4,4,160:ws 256,3:ws \
      --results "$OUT/results.jsonl" 2>&1 | tee "$OUT/decode_launch.log"
    timeout 240 "$PY" -m pytest tests/kernels/test_decode_attention.py -q -p no:cacheprovider -k warp_split 2>&1 \
      | tail -5 | tee "$OUT/warp_split_tests.log"
    ;;
  store)
    timeout 150 "$PY" benchmarks/bench_v_store.py --results "$OUT/results.jsonl" 2>&1 | tee "$OUT/v_store.log"
    for round in 1 2 3; do
      if [ -n "${OLD:-}" ]; then
        (cd "$OLD" && NANOVLLM_COMMIT="${OLD_COMMIT:-old}" timeout 90 "$PY" benchmarks/bench_kernels.py --qkv-prep \
          "$OUT/results.jsonl" | grep '^qkv_prep' | sed "s/^/old round $round: /") | tee -a "$OUT/qkv_prep.log"
      fi
      timeout 90 "$PY" benchmarks/bench_kernels.py --qkv-prep "$OUT/results.jsonl" | grep '^qkv_prep' \
        | sed "s/^/new round $round: /" | tee -a "$OUT/qkv_prep.log"
    done
    timeout 200 "$PY" -m pytest tests/kernels/test_qkv_prep.py tests/kernels/test_store_kvcache.py -q \
      -p no:cacheprovider -m gpu 2>&1 | tail -5 | tee "$OUT/qkv_store_tests.log"
    ;;
  ab)
    [ -n "${OLD:-}" ] || { echo "ab needs OLD=<a copy of the tree to compare against>" >&2; exit 2; }
    for round in 1 2 3; do
      for tree in old new; do
        dir=.; label="${NANOVLLM_COMMIT:-new}"
        [ "$tree" = old ] && { dir="$OLD"; label="${OLD_COMMIT:-old}"; }
        (cd "$dir" && NANOVLLM_COMMIT="$label" timeout 120 "$PY" benchmarks/bench_fp8.py --parts reference \
          --runs 1 --results "$OUT/ab_$tree.jsonl" --note "$NOTE; A/B of two trees, round $round of 3" \
          > "$OUT/ab_${tree}_$round.log" 2>&1)
        grep -E '^reference ' "$OUT/ab_${tree}_$round.log" | sed "s/^/$tree ($label): /"
      done
    done
    for tree in old new; do
      grep -h '"kv_cache_fp8_speed"' "$OUT/ab_$tree.jsonl" >> "$OUT/results.jsonl"
      "$PY" benchmarks/bench_fp8.py --summarize "$OUT/ab_$tree.jsonl" | tee "$OUT/ab_${tree}_summary.json"
    done
    ;;
  *) echo "unknown part $1: all | kernels | reference | long | tests | warps | store | ab" >&2; exit 2 ;;
esac
