"""Where a prefill step's GPU time goes (CUDA): bench.py's prefill measurement (8 prompts of 1,024
tokens, one token each) under torch.profiler, the top kernels by device time.

    python benchmarks/profile_prefill.py [--seqs 8] [--length 1024]
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.benchmark import run_steps, write_random_qwen3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ckpt-dir", default="/tmp/ck")
    args = parser.parse_args()
    llm = LLM(write_random_qwen3(args.ckpt_dir), max_model_len=4096, skip_tokenizer_init=True,
              max_num_batched_tokens=16384)  # fmt: skip
    rng = random.Random(1)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1)
    for run in range(3):  # the first two unprofiled: warm-up, then the wall time alone
        prompts = [[rng.randint(0, 10000) for _ in range(args.length)] for _ in range(args.seqs)]
        torch.cuda.synchronize()
        if run < 2:
            start = time.perf_counter()
            run_steps(llm, prompts, [params] * args.seqs)
            torch.cuda.synchronize()
            tok_s = args.seqs * args.length / (time.perf_counter() - start)
            print(f"run {run}: {tok_s:,.0f} prompt tok/s")
            continue
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_steps(llm, prompts, [params] * args.seqs)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=16, max_name_column_width=70)
    print(table)
    llm.shutdown()


if __name__ == "__main__":
    main()
