"""Decode attention at one layer (Qwen3-0.6B shapes) under launch settings and layouts the kernel
takes without a change: a sweep to find out what holds the fp8 cache below copy bandwidth (CUDA only).

Context lengths uniform in 100..2048 as the reference workload's decode, rows longest first, the
shipped split count; every variant checked against the float32 reference. Each fp8 variant is a
spec ``block_n,stages[,warps[,maxnreg]][:layout]``, layout ``hm`` (K head-major inside a block:
each head's keys contiguous) or ``ps`` (rows stored longest first, so no ``order`` indirection).
bf16 and bf16 with presorted rows are the same-run baselines. Prints one row per (batch, variant)
with the kernel's registers and shared memory, and appends one JSON line to ``--results``
(default benchmarks/results.jsonl).

    python benchmarks/bench_decode_launch.py 128,5 64,5,4,96 128,5:hm 128,5:ps [--results F]
    ncu --clock-control none -k regex:_decode_split_kernel --launch-skip 2 --launch-count 1 \\
        python benchmarks/bench_decode_launch.py --ncu 128,5      # three launches at batch 256
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_kernels import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, copy_bandwidth_gbs, paged_cache  # noqa: E402
from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.kernels.decode_attention import _decode_split_kernel, choose_num_splits, paged_decode_attention  # noqa: E402
from nanovllm.kernels.reference import paged_decode_attention_ref  # noqa: E402

BATCHES = (256, 128, 64, 8)


def parse(spec: str) -> tuple[int | None, dict, str]:
    """'bf16' / 'bf16:ps', or 'block_n,stages[,warps[,maxnreg]][:layout]' -> (block_n, launch, layout)."""
    head, _, layout = spec.partition(":")
    assert layout in ("", "hm", "ps"), f"layout {layout!r}: hm or ps"
    if head == "bf16":
        return None, {}, layout
    parts = [int(x) for x in head.split(",")]
    launch = {"num_stages": parts[1]} | ({"num_warps": parts[2]} if len(parts) > 2 else {})
    return parts[0], launch | ({"maxnreg": parts[3]} if len(parts) > 3 else {}), layout


def setup(batch: int, spec: str, seed: int = 100):
    """The inputs of one variant: the same lengths and block order for every variant of a batch."""
    block_n, launch, layout = parse(spec)
    fp8 = not spec.startswith("bf16")
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(100, 2049, (batch,), generator=gen).tolist()
    k, v, table, ctx = paged_cache(lens, gen, torch.float8_e4m3fn if fp8 else torch.bfloat16, fp8)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    scales = torch.tensor([0.5], device="cuda"), torch.tensor([0.25], device="cuda")
    rows = sorted(range(batch), key=lambda i: -lens[i])
    order = None
    if batch >= 16:  # as the engine orders them
        order = torch.tensor([rows, [lens[i] for i in rows]], dtype=torch.int32, device="cuda")
    if layout == "ps" and order is not None:
        at = torch.tensor(rows, device="cuda")
        q, table, ctx, order = q[at].contiguous(), table[at].contiguous(), ctx[at].contiguous(), None
        lens = [lens[i] for i in rows]
    if layout == "hm":
        k = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    args = (q, k, v, table, ctx, HEAD_DIM**-0.5, 4096, choose_num_splits(batch, NUM_KV_HEADS, 4096), *scales)
    run = lambda: paged_decode_attention(*args, order=order, launch=launch or None, block_n=block_n)  # noqa: E731
    return lens, args, run, fp8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("specs", nargs="*", default=["128,5"])
    p.add_argument("--ncu", action="store_true", help="only three launches of each spec at batch 256")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    if args.ncu:
        for spec in args.specs:
            run = setup(256, spec)[2]
            for _ in range(3):
                run()
        torch.cuda.synchronize()
        return
    copy = copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s")
    rows, seen = [], set()
    for batch in BATCHES:
        for spec in ["bf16", "bf16:ps", *args.specs]:
            lens, inputs, run, fp8 = setup(batch, spec)
            ref = paged_decode_attention_ref(*inputs[:6], *inputs[8:]).float()
            err = ((run().float() - ref).norm() / ref.norm()).item()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200)
            gbs = sum(lens) * NUM_KV_HEADS * HEAD_DIM * 2 * (1 if fp8 else 2) / ms / 1e6
            row = {"batch": batch, "variant": spec, "us": round(ms * 1e3, 1),
                   "frac_of_copy_bw": round(gbs / copy, 3), "rel_err": round(err, 5)}  # fmt: skip
            for kernel in _decode_split_kernel.device_caches[0][0].values():  # the kernels built so far
                if id(kernel) not in seen:
                    seen.add(id(kernel))
                    row |= {"regs": kernel.n_regs, "shared_bytes": kernel.metadata.shared}
            print(row, flush=True)
            rows.append(row)
    line = {"bench": "decode_launch_sweep", "device": torch.cuda.get_device_name(), "commit": git_commit(),
            "copy_gbs": round(copy), "rows": rows,
            "workload": "one layer, 16/8 heads x 128, lengths uniform 100..2048, rows longest first, "
                        "shipped splits; bf16 rows are the same-run baseline"}  # fmt: skip
    _record(line, args.results or str(Path(__file__).with_name("results.jsonl")))


if __name__ == "__main__":
    main()
