"""The flat decode kernel (kernels/decode_flat.py) against the shipped split kernel, one layer at
Qwen3-0.6B shapes, on a CUDA GPU.

Context lengths uniform in 100..2048 as the reference workload's decode; the split kernel as the
engine runs it (its split count, rows longest first from 16 rows, fp8 with key-major V and 128-key
tiles); the flat kernel at several tile sizes, warps, pipeline depths and programs per SM. Every
variant is checked against the float32 reference and timed from a CUDA graph; the host's time to
plan a step is printed beside (median of 50 calls, this machine's CPU). Appends one JSON line to ``--results``
(default benchmarks/results.jsonl).

    python benchmarks/bench_decode_flat.py [--results F]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_kernels import (  # noqa: E402
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    copy_bandwidth_gbs,
    paged_cache,
)
from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.kernels.decode_attention import choose_num_splits, paged_decode_attention  # noqa: E402
from nanovllm.kernels.decode_flat import _decode_flat_kernel, fits_per_sm, flat_decode_attention  # noqa: E402
from nanovllm.kernels.flat_plan import plan_flat_decode  # noqa: E402
from nanovllm.kernels.reference import paged_decode_attention_ref  # noqa: E402

BATCHES = (256, 128, 64, 32, 8, 1)
FP8 = torch.float8_e4m3fn
# (cache, keys a tile, warps, stages, programs per SM, register cap or None). Triton gives the fp8 loop
# one K/V buffer at 4 stages, two at 5 or 6 (sm_90 SASS compiled on a CPU, 128-key tiles, 4 warps:
# 168 registers; 45 KB of shared memory at 4 stages, 82 KB at 5), so 3 programs fit an SM at 4
# stages, 2 at 5 or 6, 4 only with a register cap; 64-key tiles at 5 stages: 168 and 49 KB (3 an SM);
# 256-key tiles, 8 warps, 4 stages: 186 and 78 KB (1 an SM). A program past what fits waits for a
# whole range to end: a second wave (the 5-stage, 3-an-SM row shows what that costs).
FLAT = [
    (FP8, 128, 4, 5, 1, None), (FP8, 128, 4, 5, 2, None), (FP8, 128, 4, 5, 3, None),
    (FP8, 128, 4, 6, 2, None), (FP8, 128, 4, 4, 2, None), (FP8, 128, 4, 4, 3, None),
    (FP8, 128, 4, 4, 4, 128), (FP8, 64, 4, 5, 3, None), (FP8, 256, 8, 4, 1, None),
    (DTYPE, 64, 4, 3, 2, None), (DTYPE, 64, 4, 3, 3, None), (DTYPE, 64, 4, 5, 2, None),
]  # fmt: skip


def timed(ref: torch.Tensor, kv_bytes: int, copy_gbs: float, fn, *args, **kwargs) -> dict:
    """A CUDA-graph replay of ``fn(*args, **kwargs)``: microseconds, share of copy bandwidth, and its
    error against ``ref``."""
    run = lambda: fn(*args, **kwargs)  # noqa: E731
    err = ((run().float() - ref).norm() / ref.norm()).item()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    us = triton.testing.do_bench(graph.replay, warmup=25, rep=150) * 1e3
    return {
        "us": round(us, 1),
        "frac_of_copy_bw": round(kv_bytes / us / 1e3 / copy_gbs, 3),
        "rel_err": round(err, 5),
    }


def plan_us(*args) -> float:
    """Median host microseconds of ``plan_flat_decode(*args)`` over 50 calls."""
    times = []
    for _ in range(50):
        start = time.perf_counter()
        plan_flat_decode(*args)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default=None)
    args = p.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy {copy_gbs:.0f} GB/s, {sms} SMs")
    rows, seen, built = [], set(), {}
    for seed, batch in enumerate(BATCHES):
        gen = torch.Generator().manual_seed(100 + seed)
        lens = torch.randint(100, 2049, (batch,), generator=gen).tolist()
        for cache_dtype in (DTYPE, FP8):
            fp8 = cache_dtype == FP8
            k_cache, v_cache, table, ctx = paged_cache(lens, gen, cache_dtype, fp8)
            host_table = table.cpu()
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            scales = torch.tensor([0.5], device="cuda"), torch.tensor([0.25], device="cuda")
            ref = paged_decode_attention_ref(q, k_cache, v_cache, table, ctx, HEAD_DIM**-0.5, *scales).float()
            kv_bytes = sum(lens) * NUM_KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
            base = {"kv_cache_dtype": str(cache_dtype).removeprefix("torch."), "batch": batch}

            order = None  # the engine's: rows longest first from 16 rows on
            if batch >= 16:
                by_len = sorted(range(batch), key=lambda i: -lens[i])
                order = torch.tensor([by_len, [lens[i] for i in by_len]], dtype=torch.int32, device="cuda")
            splits = choose_num_splits(batch, NUM_KV_HEADS, 4096)
            split_args = (q, k_cache, v_cache, table, ctx, HEAD_DIM**-0.5, 4096, splits, *scales)
            row = timed(ref, kv_bytes, copy_gbs, paged_decode_attention, *split_args, order=order)
            rows.append(base | {"kernel": "split", "num_splits": splits} | row)
            print(rows[-1], flush=True)

            for dtype, block_n, warps, stages, per_sm, maxnreg in FLAT:
                if dtype != cache_dtype:
                    continue
                launch = {"num_warps": warps, "num_stages": stages} | (
                    {"maxnreg": maxnreg} if maxnreg else {}
                )
                programs = max(1, per_sm * sms // NUM_KV_HEADS)
                plan_args = (lens, host_table, BLOCK_SIZE, block_n, programs)
                plan = plan_flat_decode(*plan_args)
                flat_args = (q, k_cache, v_cache, plan.to("cuda"), HEAD_DIM**-0.5, *scales)
                row = timed(ref, kv_bytes, copy_gbs, flat_decode_attention, *flat_args, launch=launch)
                for kernel in _decode_flat_kernel.device_caches[0][0].values():  # the variant just built
                    if id(kernel) not in seen:
                        seen.add(id(kernel))
                        built[(dtype, block_n, warps, stages, maxnreg)] = {
                            "regs": kernel.n_regs,
                            "shared_bytes": kernel.metadata.shared,
                            "fits_per_sm": fits_per_sm(kernel, torch.device("cuda"), warps),
                        }
                used = int((plan.bounds[1:] > plan.bounds[:-1]).sum())
                variant = {"kernel": "flat", "block_n": block_n, "warps": warps, "stages": stages,
                           "maxnreg": maxnreg, "programs_per_sm": per_sm, "programs_used": used}  # fmt: skip
                rows.append(
                    base
                    | variant
                    | row
                    | {"plan_us_host": plan_us(*plan_args)}
                    | built.get((dtype, block_n, warps, stages, maxnreg), {})
                )
                print(rows[-1], flush=True)
    line = {"bench": "decode_flat_sweep", "device": torch.cuda.get_device_name(), "commit": git_commit(),
            "copy_gbs": round(copy_gbs), "rows": rows,
            "workload": "one layer, 16/8 heads x 128, 256-slot blocks, lengths uniform 100..2048, CUDA-graph "
                        "replay; fp8 scales 0.5 / 0.25, V key-major; the split kernel's tiles 128 keys "
                        "(fp8), 64 (bf16)",
            "baseline": "the shipped split kernel on the same cache, same run"}  # fmt: skip
    _record(line, args.results or str(Path(__file__).with_name("results.jsonl")))


if __name__ == "__main__":
    main()
