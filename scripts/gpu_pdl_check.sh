#!/usr/bin/env bash
# Programmatic dependent launch (kernels/pdl.py) and the fp8 decode kernel's variants on one GPU.
# Logs and result lines go to $OUT.
# Usage on the GPU machine: OUT=/some/dir NANOVLLM_COMMIT=<sha> bash scripts/gpu_pdl_check.sh PART...
#   sweep    benchmarks/bench_kernels.py --fp8-sweep: fp8 decode variants against bf16, each checked   ~2 min
#   latency  benchmarks/bench_decode_variants.py: decode latency at batch 1 / 8 / 64, PDL on / off
#            alternating, graphs captured again for each                                           ~2 min
#   profile  benchmarks/profile_overlap.py at batch 1 and 64: GPU busy and idle per decode step       ~1 min
#   tests    the GPU tests of the kernels PDL touches and of the engine (PDL on against off)        ~3 min
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/device.txt"
for part in "$@"; do
  case "$part" in
    sweep)
      timeout 170 "$PY" benchmarks/bench_kernels.py --fp8-sweep "$OUT/results.jsonl" > "$OUT/fp8_sweep.log" 2>&1 \
        || echo "fp8 sweep exited $?"
      grep '^sweep' "$OUT/fp8_sweep.log" || tail -20 "$OUT/fp8_sweep.log" ;;
    latency)
      timeout 240 "$PY" benchmarks/bench_decode_variants.py --rounds 3 --results "$OUT/results.jsonl" \
        > "$OUT/pdl.log" 2>&1 || echo "bench_decode_variants exited $?"
      grep '^variant' "$OUT/pdl.log" || tail -20 "$OUT/pdl.log" ;;
    profile)
      timeout 150 "$PY" benchmarks/profile_overlap.py --batch 1 64 --steps 50 > "$OUT/profile.log" 2>&1 \
        || echo "profile_overlap exited $?"
      tail -4 "$OUT/profile.log" | cut -c1-600 ;;
    tests)
      timeout 220 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gemv.py \
        tests/kernels/test_decode_attention.py tests/kernels/test_qkv_prep.py tests/gpu/test_engine_gpu.py \
        2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
    *) echo "unknown part $part: sweep | latency | profile | tests" >&2; exit 2 ;;
  esac
done
