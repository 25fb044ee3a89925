"""GPU idle time between consecutive forwards, with and without async scheduling (CUDA only).

Runs a decode-heavy stretch (``--batch`` sequences of 512-token prompts, decoding) under
``torch.profiler`` and merges the intervals of every GPU kernel and copy: idle = the stretch's span
minus the time some GPU work ran. Prints one JSON line per (mode, batch); ``--trace DIR`` also
writes Chrome traces.

python benchmarks/profile_overlap.py [--batch 1 64 256] [--steps 50] [--trace DIR]
"""

import argparse
import json
import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.benchmark import write_random_qwen3


def gpu_busy_us(prof) -> tuple[float, float]:
    """(span, busy) in microseconds over the GPU events of ``prof``."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return 0.0, 0.0
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return spans[-1][1] - spans[0][0], busy


def measure(llm, batch: int, steps: int, trace: str | None, label: str, table: int) -> dict:
    engine = llm.engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.6, max_tokens=steps + 20, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(None, [rng.randint(0, 10000) for _ in range(512)], params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_completion_tokens < 2 for s in sched.running):
        engine.step()  # every prompt prefilled: the stretch below is all decode
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # GPU only: little overhead on the host
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    span, busy = gpu_busy_us(prof)
    if table:  # where the GPU time goes, per kernel
        print(f"batch {batch}, {steps} steps:")
        print(
            prof.key_averages().table(sort_by="device_time_total", row_limit=table, max_name_column_width=60)
        )
    if trace:
        prof.export_chrome_trace(os.path.join(trace, f"trace_{label}_bs{batch}.json"))
    return {
        "mode": label,
        "batch": batch,
        "steps": steps,
        "ms_per_step_profiled": round(1e3 * wall / steps, 3),
        "gpu_busy_us_per_step": round(busy / steps, 1),
        "gpu_idle_us_per_step": round((span - busy) / steps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--ckpt-dir", default="/tmp/nanovllm-qwen3-0.6b-random")
    parser.add_argument("--trace", default=None)
    parser.add_argument(
        "--table", type=int, default=0, metavar="ROWS", help="print the top kernels (async run)"
    )
    parser.add_argument("--modes", nargs="+", default=["async", "sync"], choices=["async", "sync"])
    args = parser.parse_args()
    path = write_random_qwen3(args.ckpt_dir)
    for label in args.modes:
        mode = label == "async"
        # two engines, one after the other, in one process: each sizes its cache to half the card
        kw = dict(skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.45)
        with LLM(path, async_scheduling=mode, **kw) as llm:
            for batch in args.batch:
                result = measure(llm, batch, args.steps, args.trace, label, args.table if mode else 0)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
