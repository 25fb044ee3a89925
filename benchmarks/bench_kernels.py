"""Benchmark the paged-attention kernels on a CUDA GPU; ends with one JSON line.

Decode is bound by memory: it is reported as GB/s of K/V read and as a fraction of the bandwidth of
a large device-to-device copy measured here, for a bf16 cache and, beside it, an fp8 (float8_e4m3fn)
cache at the same shapes (half the bytes: at the same GB/s it is twice as fast), its V key-major as
the engine lays it out, with 64-key tiles as the engine runs it and with 128-key tiles, which keep as
many bytes in flight per tile as bf16's 64. Prefill is reported in
TFLOP/s (causal: half of the dense 4 * q_len * context_len * head_dim flops per head).

    python benchmarks/bench_kernels.py [results.jsonl]   # Qwen3-0.6B attention shapes, one layer
    python benchmarks/bench_kernels.py --qkv-prep [results.jsonl]   # qkv_prep alone (~20 s)

The JSON line is also appended to benchmarks/results.jsonl (device, commit and date included).
"""

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.kernels.decode_attention import choose_num_splits, paged_decode_attention  # noqa: E402
from nanovllm.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from nanovllm.kernels.qkv_prep import qkv_prep  # noqa: E402
from nanovllm.kernels.reference import key_major, paged_decode_attention_ref, to_key_major  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 256
DTYPE = torch.bfloat16


def copy_bandwidth_gbs() -> float:
    """Read + write bytes per second of a 1 GiB device copy: the practical HBM ceiling."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def paged_cache(
    context_lens: list[int], gen: torch.Generator, cache_dtype: torch.dtype = DTYPE, v_key_major: bool = False
):
    """A cache holding exactly these sequences, blocks shuffled; block table padded with -1.
    v_key_major: V laid out as the engine's fp8 cache (reference.key_major)."""
    blocks = [math.ceil(n / BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(blocks)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda").to(cache_dtype)
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda").to(cache_dtype)
    if v_key_major:
        v_cache = to_key_major(v_cache)
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(context_lens), max(blocks)), -1, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = ids[used : used + nb]
        used += nb
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, table.cuda(), lens


def bench_decode(
    batch: int,
    context_len: int | None,  # None: lengths uniform in 100..2048, rows longest first
    copy_gbs: float,
    seed: int,
    cache_dtype=DTYPE,
    block_n: int = 64,
    launch: dict | None = None,
    check: bool = False,
    v_key_major: bool = False,
    layout: str = "",  # "hm": K head-major inside a block; "ps": rows stored longest first, no order
) -> dict:
    gen = torch.Generator().manual_seed(seed)  # the same lengths and block order for every cache dtype
    if context_len is None:  # spread as the reference workload's, taken longest first as the engine does
        context_lens = torch.randint(100, 2049, (batch,), generator=gen).tolist()
    else:
        jitter = torch.randint(-context_len // 8, context_len // 8 + 1, (batch,), generator=gen)
        context_lens = (context_len + jitter).clamp(min=1).tolist()
    k_cache, v_cache, table, lens = paged_cache(context_lens, gen, cache_dtype, v_key_major)
    order = None
    if context_len is None:
        rows = sorted(range(batch), key=lambda i: -context_lens[i])
        order = torch.tensor([rows, [context_lens[i] for i in rows]], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    if layout == "ps" and order is not None:  # the rows already in order: no indirection
        at = order[0].long()
        q, table, lens, order = q[at].contiguous(), table[at].contiguous(), lens[at].contiguous(), None
    if layout == "hm":
        k_cache = k_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    scales = torch.tensor([0.5], device="cuda"), torch.tensor([0.25], device="cuda")
    max_len = max(context_lens)
    splits = choose_num_splits(batch, NUM_KV_HEADS, max_len)  # the engine's split count (64-key tiles)
    # Timed as the engine runs decode: replayed from a CUDA graph, so small batches are not
    # measuring Python launch overhead.
    run = lambda: paged_decode_attention(
        q, k_cache, v_cache, table, lens, HEAD_DIM**-0.5, max_len, splits, *scales, block_n=block_n,
        launch=launch, order=order,
    )  # fmt: skip
    out = run()
    err = None
    if check:  # against the float32 reference: a fast variant must compute the same function
        ref = paged_decode_attention_ref(
            q, k_cache, v_cache.contiguous(), table, lens, HEAD_DIM**-0.5, *scales
        )
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200)
    kv_bytes = sum(context_lens) * NUM_KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
    gbs = kv_bytes / ms / 1e6
    return {
        "kv_cache_dtype": str(cache_dtype).removeprefix("torch."),
        "block_n": block_n,
        "v_layout": "key-major" if v_key_major else "slot-major",
        "batch": batch,
        "mean_context_len": sum(context_lens) / batch,
        "num_splits": splits,
        "us": round(ms * 1e3, 1),
        "kv_gbs": round(gbs, 1),
        "frac_of_copy_bw": round(gbs / copy_gbs, 3),
        **({"launch": launch} if launch else {}),
        **({"layout": layout} if layout else {}),
        **({"rel_err": round(err, 5)} if err is not None else {}),
    }


def bench_prefill(batch: int, seq_len: int, gen: torch.Generator, cache_dtype=DTYPE) -> dict:
    k_cache, v_cache, table, lens = paged_cache([seq_len] * batch, gen, cache_dtype)
    scales = torch.tensor([0.5], device="cuda"), torch.tensor([0.25], device="cuda")
    q = torch.randn(batch * seq_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * seq_len
    ms = triton.testing.do_bench(
        lambda: paged_prefill_attention(
            q, k_cache, v_cache, cu, lens, table, HEAD_DIM**-0.5, seq_len, *scales
        ),
        warmup=25,
        rep=200,
    )
    flops = batch * NUM_HEADS * 4 * HEAD_DIM * seq_len * seq_len / 2
    return {
        "kv_cache_dtype": str(cache_dtype).removeprefix("torch."),
        "batch": batch,
        "seq_len": seq_len,
        "us": round(ms * 1e3, 1),
        "tflops": round(flops / ms / 1e9, 1),
    }


def fp8_sweep(copy_gbs: float) -> list[dict]:
    """The decode kernel's launch variants, bf16 and fp8 caches: tile, warps and stages. Triton's
    loop pipeliner gives this loop one K/V buffer at 3 or 4 stages (the block-table load before the
    tile's takes one of the stages), two at 5 or 6 and three at 7, so stages here count buffers in
    flight. Shapes with jittered lengths and, last, the reference workload's spread (lengths uniform
    in 100..2048, rows longest first); every variant checked against the float32 reference."""
    rows = []
    f8 = torch.float8_e4m3fn
    configs = [(DTYPE, 64, 4, 3, False), (f8, 128, 4, 3, False)] + [
        (f8, bn, w, st, True) for bn, w in ((64, 4), (128, 4), (128, 8), (64, 8), (256, 8)) for st in (3, 5)
    ]  # fmt: skip
    shapes = [(256, 1000), (128, 1000), (64, 4096), (8, 2048), (1, 4096), (256, None), (64, None)]
    for seed, (b, n) in enumerate(shapes):
        for dtype, bn, w, st, km in configs:
            launch = {"num_warps": w, "num_stages": st}
            rows.append(bench_decode(b, n, copy_gbs, seed, dtype, bn, launch, check=True, v_key_major=km))
    for r in rows:
        launch = r["launch"]
        print(
            f"sweep batch {r['batch']:>3} ctx ~{r['mean_context_len']:>5.0f} {r['kv_cache_dtype']:<13} "
            f"{r['v_layout']:<10} tile {r['block_n']:>3} warps {launch['num_warps']} "
            f"stages {launch['num_stages']}: "
            f"{r['us']:>7.1f} us {r['frac_of_copy_bw']:.0%} of copy  err {r.get('rel_err', '-')}"
        )
    return rows


def balance_sweep(copy_gbs: float) -> list[dict]:
    """Decode batches whose context lengths spread as the reference workload's do (uniform in
    100..2048 keys; the run's tail is the small batches): the shipped split count against half, two
    and four times it, each cache as the engine lays it out (fp8: V key-major, the default tile), rows
    longest first from 16 rows on as the engine orders them; every variant checked against the
    float32 reference."""
    rows = []
    for seed, batch in enumerate((256, 128, 64, 32, 16, 8)):
        gen = torch.Generator().manual_seed(100 + seed)
        lens = torch.randint(100, 2049, (batch,), generator=gen).tolist()
        base = choose_num_splits(batch, NUM_KV_HEADS, 4096)
        for cache_dtype in (DTYPE, torch.float8_e4m3fn):
            k_cache, v_cache, table, ctx = paged_cache(lens, gen, cache_dtype, cache_dtype != DTYPE)
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            scales = torch.tensor([0.5], device="cuda"), torch.tensor([0.25], device="cuda")
            ref = paged_decode_attention_ref(q, k_cache, v_cache, table, ctx, HEAD_DIM**-0.5, *scales).float()
            order = None
            if batch >= 16:
                by_len = sorted(range(batch), key=lambda i: -lens[i])
                order = torch.tensor([by_len, [lens[i] for i in by_len]], dtype=torch.int32, device="cuda")
            for splits in sorted({max(1, base // 2), base, min(2 * base, 64), min(4 * base, 64)}):
                args = (q, k_cache, v_cache, table, ctx, HEAD_DIM**-0.5, 4096, splits, *scales)
                run = lambda args=args, order=order: paged_decode_attention(*args, order=order)
                err = ((run().float() - ref).norm() / ref.norm()).item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                ms = triton.testing.do_bench(graph.replay, warmup=25, rep=150)
                gbs = sum(lens) * NUM_KV_HEADS * HEAD_DIM * 2 * k_cache.element_size() / ms / 1e6
                row = {"kv_cache_dtype": str(cache_dtype).removeprefix("torch."), "batch": batch,
                       "num_splits": splits, "shipped_splits": base, "longest_first": order is not None,
                       "us": round(ms * 1e3, 1), "frac_of_copy_bw": round(gbs / copy_gbs, 3),
                       "rel_err": round(err, 5)}  # fmt: skip
                print(f"balance {row}")
                rows.append(row)
    return rows


def bench_qkv_prep(batch: int, cache_dtype: torch.dtype, v_key_major: bool, num_blocks: int = 4500) -> dict:
    """The fused norm + rotary + KV store of one decode step: one token per sequence, each in its own
    block of a cache as large as the reference workload's, at a random slot."""
    gen = torch.Generator().manual_seed(batch)
    rows = NUM_HEADS + 2 * NUM_KV_HEADS
    qkv = torch.randn(batch, rows * HEAD_DIM, generator=gen).to(DTYPE).cuda()
    positions = torch.randint(0, 4000, (batch,), generator=gen).cuda()
    cos_sin = torch.randn(4096, HEAD_DIM, generator=gen).cuda()
    weights = (1 + 0.1 * torch.randn(2, HEAD_DIM, generator=gen)).to(DTYPE).cuda().unbind(0)
    blocks = torch.randperm(num_blocks, generator=gen)[:batch]
    slots = (blocks * BLOCK_SIZE + torch.randint(0, BLOCK_SIZE, (batch,), generator=gen)).cuda()
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.zeros(shape, dtype=cache_dtype, device="cuda")
    v_cache = key_major(torch.zeros_like(k_cache)) if v_key_major else torch.zeros_like(k_cache)
    scales = torch.tensor([0.5], device="cuda"), torch.tensor([0.25], device="cuda")
    run = lambda: qkv_prep(qkv, positions, cos_sin, NUM_HEADS, NUM_KV_HEADS, k_cache, v_cache, slots,
                           *weights, 1e-6, *scales)  # fmt: skip
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200)
    return {"kv_cache_dtype": str(cache_dtype).removeprefix("torch."), "batch": batch,
            "v_layout": "key-major" if v_key_major else "slot-major", "us": round(ms * 1e3, 2)}  # fmt: skip


def qkv_prep_rows(batches: tuple[int, ...]) -> list[dict]:
    """bench_qkv_prep for the bf16 cache, fp8 slot-major and fp8 key-major V, printed as they come."""
    rows = []
    for b in batches:
        for dtype, km in ((DTYPE, False), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True)):
            rows.append(bench_qkv_prep(b, dtype, km))
            print(f"qkv_prep {rows[-1]}")
    return rows


def main() -> None:
    assert torch.cuda.is_available(), "the kernel benchmark needs a CUDA device"
    if "--qkv-prep" in sys.argv:  # one decode step's qkv_prep, to compare two trees in one device call
        rows = qkv_prep_rows((256, 64, 8, 1))
        _record({
            "bench": "qkv_prep_decode",
            "device": torch.cuda.get_device_name(),
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": "Qwen3-0.6B qkv_prep (norm + rotary + KV store), one decode step, one token a "
            "sequence at a random slot of its own block in a 4,500-block cache, CUDA-graph replay",
            "baseline": "the bf16 cache, same run (and another tree's rows from the same device call)",
            "rows": rows,
        }, sys.argv[-1] if sys.argv[-1].endswith(".jsonl") else None)  # fmt: skip
        return
    if "--balance-sweep" in sys.argv:
        copy_gbs = copy_bandwidth_gbs()
        qkv_rows = qkv_prep_rows((256, 64, 8))
        _record({
            "bench": "decode_balance_sweep",
            "device": torch.cuda.get_device_name(),
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": "Qwen3-0.6B decode attention, one layer, CUDA-graph replay; context lengths "
            "uniform in 100..2048; bound 4096; fp8 V key-major. qkv_prep: one decode step, one token "
            "a sequence in a 4,500-block cache",
            "baseline": "the shipped split count, same run; qkv_prep: the bf16 cache, same run",
            "copy_gbs": round(copy_gbs, 1),
            "rows": balance_sweep(copy_gbs),
            "qkv_prep": qkv_rows,
        }, sys.argv[-1] if sys.argv[-1].endswith(".jsonl") else None)  # fmt: skip
        return
    if "--fp8-sweep" in sys.argv:
        sys.argv.remove("--fp8-sweep")
        copy_gbs = copy_bandwidth_gbs()
        result = {
            "bench": "decode_fp8_sweep",
            "device": torch.cuda.get_device_name(),
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": "Qwen3-0.6B decode attention shapes, one layer, CUDA-graph replay; "
            "fp8 scales 0.5 / 0.25; context None = lengths uniform in 100..2048, longest first",
            "baseline": "the bf16 cache at the shipped launch (64-key tiles, 4 warps, 3 stages), same run",
            "copy_gbs": round(copy_gbs, 1),
            "rows": fp8_sweep(copy_gbs),
        }
        results = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results.jsonl")
        with open(results, "a") as f:
            f.write(json.dumps(result) + "\n")
        return
    gen = torch.Generator().manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    result = {
        "bench": "kernels",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),  # NANOVLLM_COMMIT where the checkout has no git history
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workload": "Qwen3-0.6B attention shapes (16 q heads, 8 KV heads, head_dim 128, block 256), one "
        "layer, bf16 queries; decode replayed from a CUDA graph; fp8 scales 0.5 / 0.25",
        "baseline": "the bf16 cache at the same shapes, same run",
        "copy_gbs": round(copy_gbs, 1),
        "decode": [
            bench_decode(b, n, copy_gbs, seed, dtype, block_n, v_key_major=dtype != DTYPE)  # as the engine
            for seed, (b, n) in enumerate([(256, 1000), (64, 4096), (1, 4096), (8, 2048)])
            for dtype, block_n in [(DTYPE, 64), (torch.float8_e4m3fn, 64), (torch.float8_e4m3fn, 128)]
        ],
        "prefill": [bench_prefill(8, 1024, gen, dtype) for dtype in (DTYPE, torch.float8_e4m3fn)],
    }
    for d in result["decode"]:
        shape = f"{d['kv_cache_dtype']:>13} tile {d['block_n']:>3} batch {d['batch']:>3} "
        shape += f"ctx ~{d['mean_context_len']:>6.0f} splits {d['num_splits']:>2}"
        speed = f"{d['us']:>8.1f} us  {d['kv_gbs']:>7.1f} GB/s  {d['frac_of_copy_bw']:.0%} of copy"
        print(f"decode  {shape}: {speed}")
    for p in result["prefill"]:
        shape = f"{p['kv_cache_dtype']:>13} batch {p['batch']} x {p['seq_len']}"
        print(f"prefill {shape}: {p['us']:.1f} us  {p['tflops']} TFLOP/s")
    line = json.dumps(result)
    print(line)
    results = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results.jsonl")
    with open(results, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
