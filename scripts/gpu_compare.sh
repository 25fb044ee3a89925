#!/usr/bin/env bash
# One device call: this checkout against an older one (carried as .bench_old) and nano-vllm with our
# kernels (carried as .anchors), the reference workload, alternating runs. Results go to $OUT.
# Usage on the GPU machine: OUT=/dir NANOVLLM_COMMIT=<sha> OLD_COMMIT=<sha> scripts/gpu_compare.sh [runs] [extra bench args]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
runs="${1:-2}"; shift || true
root="$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt"
python3 bench.py --no-latency --ckpt-dir /tmp/ck --results /dev/null > /dev/null 2>&1  # writes the checkpoint
python3 .anchors/make_wordlevel_tokenizer.py /tmp/ck > /dev/null 2>&1
for i in $(seq "$runs"); do
  PYTHONPATH=. timeout 150 python3 bench.py --no-latency --ckpt-dir /tmp/ck --results "$OUT/results.jsonl" --note "new run $i" "$@" 2>&1 | tail -1 >> "$OUT/compare.log"
  (cd .bench_old && NANOVLLM_COMMIT="$OLD_COMMIT" PYTHONPATH=. timeout 150 python3 bench.py --no-latency --ckpt-dir /tmp/ck --results "$OUT/results.jsonl" --note "old run $i" 2>&1 | tail -1 >> "$OUT/compare.log")
  NANOVLLM_KERNELS_DIR=$root/nanovllm/kernels PYTHONPATH=$root/.anchors/flash_attn_shim:$root/.anchors/nano-vllm \
    timeout 150 python3 .anchors/bench_nanovllm.py /tmp/ck 2>&1 | tail -2 | sed "s/^/nano-vllm run $i: /" >> "$OUT/compare.log"
done
cat "$OUT/compare.log"
