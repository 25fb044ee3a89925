"""One decode step's V store into an fp8 cache, by V layout (CUDA only): why the key-major V costs
qkv_prep time, and what a chunked layout, a cache hint or reading the sector first would give back.

    python benchmarks/bench_v_store.py [--results FILE]

Each token writes its 8 KV heads x 128 dims (Qwen3-0.6B) to a random slot of its own 256-slot block,
28 layers a CUDA graph, every layer its own 4,500-block cache (as the reference workload's), so no
write finds its sector in L2. Layouts:

* slot-major: [block, slot, head, dim], a token's head is 128 contiguous bytes;
* key-major: [block, head, dim, slot] (the engine's fp8 V until 16-slot blocks): 128 bytes 256
  apart, one 32-byte sector each;
* chunk16: [block, head, slot / 16, dim, 16]: a token's head lands 16 bytes apart, two bytes a sector,
  in 2 KB; the decode kernel would still read 16 keys of one dim as one vector;
* key-major in 16- or 64-slot blocks: [block, slot / S, head, dim, S] (``reference.key_major``; the
  engine's fp8 V has S = 64): a token's heads S * 128 bytes apart; a torch view of a cache of S-slot
  blocks expresses it;
* key-major with the store's cache hints (.cs, .wt, evict_last, evict_first);
* the engine's layout, each byte's sector read before it is written: "read first" makes the stored
  value depend on the loaded one (the store waits for the read), "read first, no wait" does not
  (same-address order is the hardware's), "L2 prefetch" issues ``prefetch.global.L2`` instead, and
  "a trip ahead" one memory round trip before the store (as qkv_prep could, from the slot). A
  write that misses L2 with part of a sector is what the key-major store pays for; a read miss is
  what the decode kernel pays for the same sector a moment later anyway.
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm.benchmark import _record, git_commit  # noqa: E402

HEADS, DIM, BLOCK, NUM_BLOCKS, LAYERS = 8, 128, 256, 4500, 28
LAYOUTS = ["slot-major", "key-major", "chunk16", "key-major .cs", "key-major .wt", "key-major evict_last",
           "key-major evict_first", "key-major 16-slot blocks", "key-major 64-slot blocks",
           "64-slot, read first", "64-slot, read first, no wait", "64-slot, L2 prefetch",
           "64-slot, L2 prefetch, a trip ahead"]  # fmt: skip


@triton.jit
def _store_v(v_ptr, cache_ptr, slots_ptr, sink_ptr, LAYOUT: tl.constexpr, HEADS: tl.constexpr,
             DIM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    h = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, DIM)[None, :]
    v_src = v_ptr + token * HEADS * DIM + h * DIM + d
    if LAYOUT == 12:  # v's address depends on the slot (slot >> 62 is 0): read after the prefetch
        v_src += (slot >> 62) * 16  # times 16 keeps the loads 16-byte vectors
    v = tl.load(v_src)
    block, s = slot // BLOCK, slot % BLOCK
    base = block * BLOCK * HEADS * DIM
    if LAYOUT == 0:
        off = base + s * HEADS * DIM + h * DIM + d
    elif LAYOUT == 2:
        off = base + h * DIM * BLOCK + (s // 16) * 16 * DIM + d * 16 + s % 16
    elif LAYOUT == 7:
        off = base + (s // 16) * 16 * HEADS * DIM + h * DIM * 16 + d * 16 + s % 16
    elif LAYOUT >= 8:
        off = base + (s // 64) * 64 * HEADS * DIM + h * DIM * 64 + d * 64 + s % 64
    else:
        off = base + h * DIM * BLOCK + d * BLOCK + s
    if LAYOUT == 3:
        tl.store(cache_ptr + off, v, cache_modifier=".cs")
    elif LAYOUT == 4:
        tl.store(cache_ptr + off, v, cache_modifier=".wt")
    elif LAYOUT == 5:
        tl.store(cache_ptr + off, v, eviction_policy="evict_last")
    elif LAYOUT == 6:
        tl.store(cache_ptr + off, v, eviction_policy="evict_first")
    elif LAYOUT == 9:  # the stored value waits for the read (the cache holds no NaN, 0x7f: always v)
        old = tl.load(cache_ptr + off)
        tl.store(cache_ptr + off, tl.where((old.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, old, v))
    elif LAYOUT == 10:  # the read is used only after the store, by a sum no one needs
        old = tl.load(cache_ptr + off)
        tl.store(cache_ptr + off, v)
        tl.store(sink_ptr + token, tl.sum(tl.sum(old.to(tl.float32), axis=1), axis=0))
    elif LAYOUT >= 11:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [cache_ptr + off],
                                  dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
        tl.store(cache_ptr + off, v)
    else:
        tl.store(cache_ptr + off, v)


def time_layout(cache: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, layout: int) -> float:
    """Microseconds a layer of one step's store, replayed from a graph of LAYERS layers."""
    sink = torch.empty(v.shape[0], device=v.device)

    def store(layer: int) -> None:
        _store_v[(v.shape[0],)](v, cache[layer], slots, sink, LAYOUT=layout, HEADS=HEADS, DIM=DIM,
                                BLOCK=BLOCK, num_warps=4)  # fmt: skip

    store(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            store(layer)
    return triton.testing.do_bench(graph.replay, warmup=10, rep=200) * 1e3 / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", help="append one JSON line (device, commit, rows) to this file")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the store benchmark needs a CUDA device"
    cache = torch.zeros(LAYERS, NUM_BLOCKS * BLOCK * HEADS * DIM, dtype=torch.float8_e4m3fn, device="cuda")
    rows = []
    for batch in (256, 128, 64):
        gen = torch.Generator().manual_seed(batch)
        v = torch.randn(batch, HEADS, DIM, generator=gen).to(torch.float8_e4m3fn).cuda()
        blocks = torch.randperm(NUM_BLOCKS, generator=gen)[:batch]
        slots = (blocks * BLOCK + torch.randint(0, BLOCK, (batch,), generator=gen)).cuda()
        plain = None  # what the engine's layout's plain store wrote (layout 8), to check its variants
        for layout, name in enumerate(LAYOUTS):
            us = time_layout(cache, v, slots, layout)
            # what one layer's store leaves in a zeroed cache: the variants of one layout must agree
            cache[0].zero_()
            sink = torch.empty(batch, device="cuda")
            _store_v[(batch,)](v, cache[0], slots, sink, LAYOUT=layout, HEADS=HEADS, DIM=DIM, BLOCK=BLOCK)
            written = cache[0].view(torch.uint8)
            if layout == 8:
                plain = written.clone()
            elif layout > 8:
                assert torch.equal(written, plain), f"{name}: other bytes than the plain store"
            print(f"store batch {batch:>3} {name:<30}: {us:6.2f} us a layer")
            rows.append({"batch": batch, "v_layout": name, "us_a_layer": round(us, 2)})
    if args.results:
        _record({
            "bench": "fp8_v_store_layouts",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "device": torch.cuda.get_device_name(),
            "workload": "benchmarks/bench_v_store.py: one decode step's V store, 8 KV heads x 128 dims a "
            "token at a random slot of its own 256-slot block, 28 layers a CUDA graph, a 4,500-block "
            "cache a layer",
            "baseline": "the slot-major layout, same run",
            "rows": rows,
        }, args.results)  # fmt: skip


if __name__ == "__main__":
    main()
