"""Decode latency with programmatic dependent launch (kernels/pdl.py) on and off, in one process.

One engine on a Qwen3-0.6B-shaped random checkpoint; for each setting the CUDA graphs are captured
again, then ``bench.py``'s decode-latency measurement runs at batch 1 / 8 / 64 (128-token prompts,
128 new tokens, steady-state steps). Settings alternate, ``--rounds`` times. Ends with one JSON line
(also appended to ``results`` when given).

    python benchmarks/bench_pdl.py [--rounds 2] [--results FILE]
"""

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.benchmark import decode_latency_ms, git_commit, write_random_qwen3  # noqa: E402
from nanovllm.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from nanovllm.kernels import pdl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ckpt-dir", default="/tmp/ck")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    llm = LLM(write_random_qwen3(args.ckpt_dir), max_model_len=4096, skip_tokenizer_init=True)
    runner = getattr(llm.engine.executor, "runner", llm.engine.executor)  # rank 0's runner
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    modes = {"on": True, "off": False}
    figures: dict[str, dict[int, list[float]]] = {label: {} for label in modes}
    for _ in range(args.rounds):
        for label, mode in modes.items():
            pdl._enabled = lambda index, on=mode: on
            runner.graphs = None
            torch.cuda.synchronize()
            runner.graphs = DecodeGraphs(runner.model, runner.config, runner.device)
            decode_latency_ms(llm, 1, new_tokens=32)  # warm-up: eager kernels of this setting
            for bs in (1, 8, 64):
                ms = decode_latency_ms(llm, bs)
                figures[label].setdefault(bs, []).append(ms)
                print(f"pdl {label:>5} batch {bs:>2}: {ms:.3f} ms per decode step", flush=True)
    llm.shutdown()
    result = {
        "bench": "pdl_decode_latency",
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workload": "Qwen3-0.6B-shaped random bf16, CUDA graphs, async scheduling; bench.py decode latency "
        "(128-token prompts, 128 new tokens, temperature 0.6, steady-state steps)",
        "baseline": "the same engine with PDL off (graphs captured again), alternating, same process",
        "ms_per_step": {
            label: {bs: [round(x, 3) for x in v] for bs, v in f.items()} for label, f in figures.items()
        },
        "median_ms": {
            label: {bs: round(statistics.median(v), 3) for bs, v in f.items()} for label, f in figures.items()
        },
    }
    line = json.dumps(result)
    print(line)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
