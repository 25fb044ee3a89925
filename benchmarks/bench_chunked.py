"""Chunked prefill on and off, same run: the reference throughput workload, and latency under load.

Latency under load: 64 running decodes (128-token prompts, streamed) while a new 2,000-token prompt
arrives every 4 steps; the time between tokens of the running sequences, p50 / p99 / max. Without
chunking a step that prefills new prompts holds every decode back for its whole length.

    python benchmarks/bench_chunked.py [--results benchmarks/results.jsonl]
"""

import argparse
import datetime
import gc
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.benchmark import git_commit, run_steps, workload, write_random_qwen3  # noqa: E402

MODES = {  # label -> engine arguments
    "chunked-8192": dict(max_num_batched_tokens=8192),
    "chunked-16384": dict(max_num_batched_tokens=16384),
    "chunked-4096": dict(max_num_batched_tokens=4096),
    "unchunked-16384": dict(max_num_batched_tokens=16384, enable_chunked_prefill=False),
}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latency_under_load(llm, num_running=64, long_prompt=2000, every=4, steps=240) -> dict:
    from nanovllm import SamplingParams

    engine, rng = llm.engine, random.Random(2)
    for i in range(num_running):
        prompt = [rng.randint(0, 10000) for _ in range(128)]
        engine.add_request(
            f"bg-{i}", prompt, SamplingParams(max_tokens=steps + 50, ignore_eos=True), stream=True
        )
    while engine.stats().num_waiting:  # until every background sequence is running
        engine.step()
    gaps, last, arrivals = [], None, 0
    for step in range(steps):
        if step % every == 0:
            prompt = [rng.randint(0, 10000) for _ in range(long_prompt)]
            engine.add_request(f"long-{arrivals}", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
            arrivals += 1
        outputs = engine.step()
        now = time.perf_counter()
        if any(o.request_id == "bg-0" for o in outputs):
            if last is not None:
                gaps.append(1e3 * (now - last))
            last = now
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return {
        "itl_ms_p50": round(percentile(gaps, 0.5), 2),
        "itl_ms_p99": round(percentile(gaps, 0.99), 2),
        "itl_ms_max": round(max(gaps), 2),
        "long_prompts": arrivals,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="chunked-8192,unchunked-16384")
    parser.add_argument("--results", default=os.path.join("benchmarks", "results.jsonl"))
    parser.add_argument("--ckpt-dir", default="/tmp/nanovllm-qwen3-0.6b")
    args = parser.parse_args()
    import torch

    from nanovllm import LLM

    model = write_random_qwen3(args.ckpt_dir)
    prompts, params = workload()
    total = sum(sp.max_tokens for sp in params)
    for label in args.modes.split(","):
        llm = LLM(model, max_model_len=4096, skip_tokenizer_init=True, **MODES[label])
        llm.generate([[1, 2, 3]], params[0], use_tqdm=False)  # warm-up
        start = time.perf_counter()
        run_steps(llm, prompts, params)
        elapsed = time.perf_counter() - start
        result = {
            "bench": "chunked_prefill",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "mode": label,
            "workload": "reference throughput (256 seqs, 133,966 tokens) + latency under load "
            "(64 streamed decodes, a 2,000-token prompt every 4 steps, 240 steps)",
            "engine_tok_s": round(total / elapsed, 1),
            **latency_under_load(llm),
        }
        llm.shutdown()
        del llm  # free the weights and graphs before the next engine sizes its KV cache
        gc.collect()
        torch.cuda.empty_cache()
        line = json.dumps(result)
        print(line, flush=True)
        with open(args.results, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
