"""KV cache quality on real weights, on the CPU: the bundled SmolLM2-135M-Instruct, fp8 (and float16)
caches against the float32 cache. See nanovllm/kv_quality.py for the metrics.

    python benchmarks/quality_fp8.py [--prompts 32] [--max-tokens 128] [--headrooms 2 1 4]
                                     [--kv-dtypes fp8 float16] [--note TEXT]

fp8 variants: scales 1.0 (vLLM's default) and scales calibrated on the first prefill with each
headroom (the largest |x| seen maps to 448 / headroom). float16: the cache the CPU's packed GGUF
path uses by default. One JSON line per run, appended to benchmarks/results.jsonl.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm import LLM  # noqa: E402
from nanovllm.benchmark import git_commit  # noqa: E402
from nanovllm.kv_quality import (  # noqa: E402
    CHAT_PROMPTS,
    compare_greedy,
    greedy_chat,
    scoring_tokens,
    text_log_likelihood,
)
from nanovllm.layers import kv_quant  # noqa: E402

ENGINE_ARGS = dict(max_model_len=2048, kvcache_block_size=16, num_kvcache_blocks=1024, max_num_seqs=32)


def run_variant(kv_cache_dtype: str, calibrate: bool, prompts: list[str], max_tokens: int) -> dict:
    """Greedy chat first (its first prefill calibrates the scales), then the text's log-likelihood."""
    with LLM(None, kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=calibrate, **ENGINE_ARGS) as llm:
        start = time.perf_counter()
        chat = greedy_chat(llm, prompts, max_tokens)
        tokens = scoring_tokens(llm)
        ll = text_log_likelihood(llm, tokens)
        layers = llm.engine.executor.attention_layers
        k_scales = [layer.k_scale.item() for layer in layers]
        v_scales = [layer.v_scale.item() for layer in layers]
        model = os.path.basename(llm.config.model)
    return {
        "chat": chat,
        "log_likelihood": ll,
        "text_tokens": len(tokens),
        "seconds": time.perf_counter() - start,
        "k_scale_range": [round(min(k_scales), 5), round(max(k_scales), 5)],
        "v_scale_range": [round(min(v_scales), 5), round(max(v_scales), 5)],
        "model": model,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--headrooms", type=float, nargs="*", default=[2.0, 1.0, 4.0])
    parser.add_argument("--kv-dtypes", nargs="+", choices=["fp8", "float16"], default=["fp8"])
    parser.add_argument("--note", default="")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.jsonl")))
    args = parser.parse_args()
    prompts = CHAT_PROMPTS[: args.prompts]

    ref = run_variant("float32", False, prompts, args.max_tokens)
    print(f"float32 cache: log-likelihood {ref['log_likelihood']:.5f} in {ref['seconds']:.0f} s", flush=True)
    runs = []  # (name, kv_cache_dtype, calibrate, headroom)
    if "fp8" in args.kv_dtypes:
        runs += [("fp8, scales 1.0", "fp8", False, None)]
        runs += [(f"fp8, calibrated, headroom {h:g}", "fp8", True, h) for h in args.headrooms]
    if "float16" in args.kv_dtypes:
        runs += [("float16", "float16", False, None)]
    variants = {}
    for name, kv_dtype, calibrate, headroom in runs:
        if headroom is not None:
            kv_quant.CALIBRATION_HEADROOM = headroom
        variants[name] = v = run_variant(kv_dtype, calibrate, prompts, args.max_tokens)
        row = compare_greedy(ref["chat"], v["chat"])  # printed now: a long run killed later keeps these
        print(f"{name}: {row}, log-likelihood {v['log_likelihood']:.5f} in {v['seconds']:.0f} s", flush=True)

    result = {
        "bench": "kv_cache_fp8_quality" if "fp8" in args.kv_dtypes else "kv_cache_quality",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "model": ref["model"],
        "workload": f"{len(prompts)} chat prompts x {args.max_tokens} greedy tokens (stop at EOS); "
        f"log-likelihood of benchmarks/data/scoring_text.txt ({ref['text_tokens']} tokens) prefilled "
        "in chunks of 128 through the cache",
        "baseline": "kv_cache_dtype='float32' in the same run",
        "baseline_log_likelihood": round(ref["log_likelihood"], 5),
        "baseline_seconds": round(ref["seconds"], 1),
        "variants": {},
        "note": args.note,
    }
    for name, v in variants.items():
        row = compare_greedy(ref["chat"], v["chat"])
        row = {k: round(x, 5) if isinstance(x, float) else x for k, x in row.items()}
        row["log_likelihood"] = round(v["log_likelihood"], 5)
        row["log_likelihood_delta"] = round(v["log_likelihood"] - ref["log_likelihood"], 5)
        row["k_scale_range"], row["v_scale_range"] = v["k_scale_range"], v["v_scale_range"]
        row["seconds"] = round(v["seconds"], 1)
        result["variants"][name] = row
        print(f"{name:34s} {json.dumps(row)}")
    line = json.dumps(result)
    print(line)
    with open(args.results, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
