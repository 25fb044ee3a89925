#!/usr/bin/env bash
# One device call: the serving benchmark on the GPU (issue 12). The same requests go through a real
# `nanovllm serve` on a free port (streaming, all sent at once) and through offline LLM.generate, in
# alternating runs: offline, then RUNS times (server, offline). One result line per server run goes
# to $OUT/results.jsonl (append them to benchmarks/results.jsonl afterwards); the last line printed
# is the server/offline output-throughput ratio of each run and their median.
#
# The GPU machine has no internet and no fastapi / uvicorn / prometheus_client: they install from the
# wheelhouse .wheels/ (git-ignored; carried beside the checkout), skipped when they import already.
# Build it on a machine with PyPI (CPython 3.12, x86_64; pip resolves the dependencies):
#   timeout 300 pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels fastapi uvicorn prometheus_client
#
# Usage on the GPU machine: OUT=/some/dir NANOVLLM_COMMIT=<sha> scripts/gpu_serve_check.sh
# Knobs (environment), defaults for the GPU:
#   MODEL        model directory; default a Qwen3-0.6B-shaped checkpoint with random bf16 weights,
#                written once to CKPT_DIR (nanovllm/benchmark.py's write_random_qwen3)
#   NUM_PROMPTS  256          INPUT_LEN  "128 1024"     OUTPUT_LEN  "128 512"     RUNS  3
#   RATES        inf (comma-separated requests/s)         TEMPERATURE 0.6
#   ENGINE_ARGS  '{"max_model_len": 2048, "skip_tokenizer_init": true}' (the random checkpoint has no
#                tokenizer; prompts are token ids)
#   ENGINES      process (the engine in its own process, the server's default); "process,thread" also
#                serves with --engine-in-thread (the old design) in each run: an A/B in one call, the
#                two designs sharing the offline runs between them
# On the CPU, end to end with a tiny checkpoint (what tests/server/test_gpu_serve_check.py does):
#   MODEL=/tmp/tiny NUM_PROMPTS=8 INPUT_LEN="8 32" OUTPUT_LEN="8 16" RUNS=1 \
#   ENGINE_ARGS='{"max_model_len": 256, "device": "cpu"}' OUT=/tmp/out scripts/gpu_serve_check.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
CKPT_DIR="${CKPT_DIR:-/tmp/nanovllm-qwen3-0.6b-random}"
NUM_PROMPTS="${NUM_PROMPTS:-256}"
INPUT_LEN="${INPUT_LEN:-128 1024}"
OUTPUT_LEN="${OUTPUT_LEN:-128 512}"
RUNS="${RUNS:-3}"
RATES="${RATES:-inf}"
TEMPERATURE="${TEMPERATURE:-0.6}"
default_engine_args='{"max_model_len": 2048, "skip_tokenizer_init": true}'
ENGINE_ARGS="${ENGINE_ARGS:-$default_engine_args}"
ENGINES="${ENGINES:-process}"

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt"

# The server's dependencies, offline, from the wheelhouse; nothing is installed when they import.
if ! "$PY" -c "import fastapi, uvicorn, prometheus_client" 2> /dev/null; then
  if [ ! -d .wheels ]; then
    echo "fastapi / uvicorn / prometheus_client are missing and there is no .wheels/ to install them from" >&2
    exit 2
  fi
  PIP_BREAK_SYSTEM_PACKAGES=1 timeout 300 "$PY" -m pip install -q --no-index --find-links .wheels \
    fastapi uvicorn prometheus_client 2>&1 | tee "$OUT/pip_install.log"
  "$PY" -c "import fastapi, uvicorn, prometheus_client" || { echo "installing from .wheels failed" >&2; exit 2; }
fi

if [ -z "${MODEL:-}" ]; then
  timeout 300 "$PY" -c "import sys; from nanovllm.benchmark import write_random_qwen3; write_random_qwen3(sys.argv[1])" \
    "$CKPT_DIR" || { echo "writing the random checkpoint failed" >&2; exit 2; }
  MODEL="$CKPT_DIR"
fi

# shellcheck disable=SC2086  # INPUT_LEN / OUTPUT_LEN are two numbers each
timeout "${BENCH_TIMEOUT:-560}" "$PY" -m nanovllm.server.bench_serve --model "$MODEL" \
  --num-prompts "$NUM_PROMPTS" --input-len $INPUT_LEN --output-len $OUTPUT_LEN --runs "$RUNS" \
  --request-rates "$RATES" --temperature "$TEMPERATURE" --engine-args "$ENGINE_ARGS" --engines "$ENGINES" \
  --results "$OUT/results.jsonl" --note "scripts/gpu_serve_check.sh; baseline: offline generate of the same requests before and after each server run" \
  > "$OUT/bench_serve.log" 2>&1
status=$?
grep -E "^(run [0-9]|server/offline)" "$OUT/bench_serve.log" || tail -n 20 "$OUT/bench_serve.log"
exit $status
