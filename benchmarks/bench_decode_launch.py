"""Decode attention at one layer (Qwen3-0.6B shapes) under launch settings and layouts the kernel
takes without a change: a sweep to find out what holds the fp8 cache below copy bandwidth (CUDA only).

Context lengths uniform in 100..2048 as the reference workload's decode, rows longest first
(``bench_kernels.bench_decode``, timed from a CUDA graph); every variant checked against the
float32 reference. An fp8 variant is a spec ``block_n,stages[,warps[,maxnreg]][:layout][:ws]``,
layout ``hm`` (K head-major inside a block: each head's keys contiguous) or ``ps`` (rows stored
longest first, so no ``order`` indirection); ``ws`` splits each tile over the warps, a softmax each
(the kernel's ``warp_split`` launch option, one sub-tile per warp). bf16 and bf16 with presorted rows
are the same-run baselines.
Prints one row per (batch, variant) with the kernel's registers and shared memory, and appends one
JSON line to ``--results`` (default benchmarks/results.jsonl).

    python benchmarks/bench_decode_launch.py 128,5 64,5,4,96 128,5:hm 128,5:ps 128,5:ws [--results F]
    ncu --clock-control none -k regex:_decode_split_kernel --launch-skip 1 --launch-count 1 \\
        python benchmarks/bench_decode_launch.py --ncu 128,5      # batch 256, through bench_decode
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_kernels import bench_decode, copy_bandwidth_gbs  # noqa: E402
from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.kernels.decode_attention import _decode_split_kernel  # noqa: E402

BATCHES = (256, 128, 64, 8)


def parse(spec: str) -> dict:
    """'bf16' / 'bf16:ps', or 'block_n,stages[,warps[,maxnreg]][:layout][:ws]' -> bench_decode's
    arguments."""
    head, *flags = spec.split(":")
    assert set(flags) <= {"hm", "ps", "ws"} and len(set(flags) & {"hm", "ps"}) <= 1, f"{spec!r}: hm or ps, ws"
    layout = next((f for f in flags if f != "ws"), "")
    if head == "bf16":
        assert "ws" not in flags, "ws: fp8 specs only"
        return {"layout": layout}
    parts = [int(x) for x in head.split(",")]
    launch = {"num_stages": parts[1]} | ({"num_warps": parts[2]} if len(parts) > 2 else {})
    launch |= {"maxnreg": parts[3]} if len(parts) > 3 else {}
    launch |= {"warp_split": launch.get("num_warps", 4)} if "ws" in flags else {}
    return {"cache_dtype": torch.float8_e4m3fn, "v_key_major": True, "block_n": parts[0], "launch": launch,
            "layout": layout}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("specs", nargs="*", default=["128,5"])
    p.add_argument("--ncu", action="store_true", help="only a few launches of each spec at batch 256")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    if args.ncu:  # bench_decode runs each spec once, then its CUDA graph (ncu profiles the first launches)
        for spec in args.specs:
            bench_decode(256, None, 1.0, 100, **parse(spec))
        return
    copy = copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s")
    rows, seen = [], set()
    for batch in BATCHES:
        for spec in ["bf16", "bf16:ps", *args.specs]:
            row = {"variant": spec} | bench_decode(batch, None, copy, 100, check=True, **parse(spec))
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
