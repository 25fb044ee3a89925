"""Where the reference workload's GPU time goes, kernel by kernel (CUDA only).

Runs bench.py's workload once under ``torch.profiler`` (GPU activity only; CUDA graphs replay their
kernels one by one in the trace) and prints each kernel's share of the summed GPU time, and the
steps by kind with their summed wall time (StepStats). One JSON line to ``--results``.

python benchmarks/profile_reference.py [--top 25] [--kv-cache-dtype fp8]
"""

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM
from nanovllm.benchmark import _record, git_commit, run_steps, workload, write_random_qwen3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", default="/tmp/nanovllm-qwen3-0.6b-random")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    llm = LLM(write_random_qwen3(args.ckpt_dir), max_model_len=4096, max_num_batched_tokens=16384,
              kv_cache_dtype=args.kv_cache_dtype, skip_tokenizer_init=True)  # fmt: skip
    prompts, params = workload()
    llm.generate([[1, 2, 3]], params[0], use_tqdm=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        stats = run_steps(llm, prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:90]] += e.time_range.end - e.time_range.start
            counts[e.name[:90]] += 1
    gpu_us = sum(totals.values())
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for s in stats:
        kind = "decode" if not s.num_prefill_tokens else ("prefill" if not s.num_decode_tokens else "mixed")
        kinds[kind][0] += 1
        kinds[kind][1] += s.seconds
        kinds[kind][2] += s.num_prefill_tokens + s.num_decode_tokens
    top = sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]
    print(f"wall {wall:.2f} s, summed GPU kernel time {gpu_us / 1e6:.2f} s")
    for name, us in top:
        print(f"{us / 1e3:9.1f} ms {us / gpu_us:6.1%} {counts[name]:>7}x  {name}")
    for kind, (n, secs, toks) in kinds.items():
        print(f"{kind:>8}: {n} steps, {secs:.2f} s, {toks} tokens")
    _record({
        "bench": "reference_kernel_profile",
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "workload": "nano-vllm reference (bench.py), one run under torch.profiler (CUDA activity)",
        "kv_cache_dtype": args.kv_cache_dtype,
        "wall_s": round(wall, 3),
        "gpu_kernel_s": round(gpu_us / 1e6, 3),
        "kernels": [{"name": n, "ms": round(us / 1e3, 1), "share": round(us / gpu_us, 4), "count": counts[n]}
                    for n, us in top],  # fmt: skip
        "steps": {k: {"n": v[0], "seconds": round(v[1], 3), "tokens": v[2]} for k, v in kinds.items()},
    }, args.results)  # fmt: skip


if __name__ == "__main__":
    main()
