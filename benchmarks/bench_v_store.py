"""One decode step's V store into an fp8 cache, by V layout (CUDA only): why the key-major V costs
qkv_prep time, and what a chunked layout or a cache hint would give back.

    python benchmarks/bench_v_store.py

Each token writes its 8 KV heads x 128 dims (Qwen3-0.6B) to a random slot of its own 256-slot block,
28 layers a CUDA graph, every layer its own 4,500-block cache (as the reference workload's), so no
write finds its sector in L2. Layouts:

* slot-major: [block, slot, head, dim], a token's head is 128 contiguous bytes;
* key-major: [block, head, dim, slot] (the engine's fp8 V until 16-slot blocks): 128 bytes 256
  apart, one 32-byte sector each;
* chunk16: [block, head, slot / 16, dim, 16]: a token's head lands 16 bytes apart, two bytes a sector,
  in 2 KB; the decode kernel would still read 16 keys of one dim as one vector;
* key-major in 16-slot blocks: [block, slot / 16, head, dim, 16], the engine's fp8 V
  (``reference.key_major``): as chunk16, a token's heads 2 KB apart in 16 KB; a torch view of a cache
  of 16-slot blocks expresses it;
* key-major with the store's cache hints (.cs, .wt, evict_last, evict_first).
"""

import torch
import triton
import triton.language as tl

HEADS, DIM, BLOCK, NUM_BLOCKS, LAYERS = 8, 128, 256, 4500, 28
LAYOUTS = ["slot-major", "key-major", "chunk16", "key-major .cs", "key-major .wt", "key-major evict_last",
           "key-major evict_first", "key-major 16-slot blocks"]  # fmt: skip


@triton.jit
def _store_v(v_ptr, cache_ptr, slots_ptr, LAYOUT: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr,
             BLOCK: tl.constexpr):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    h = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, DIM)[None, :]
    v = tl.load(v_ptr + token * HEADS * DIM + h * DIM + d)
    block, s = slot // BLOCK, slot % BLOCK
    base = block * BLOCK * HEADS * DIM
    if LAYOUT == 0:
        off = base + s * HEADS * DIM + h * DIM + d
    elif LAYOUT == 2:
        off = base + h * DIM * BLOCK + (s // 16) * 16 * DIM + d * 16 + s % 16
    elif LAYOUT == 7:
        off = base + (s // 16) * 16 * HEADS * DIM + h * DIM * 16 + d * 16 + s % 16
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
    else:
        tl.store(cache_ptr + off, v)


def time_layout(cache: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, layout: int) -> float:
    """Microseconds a layer of one step's store, replayed from a graph of LAYERS layers."""

    def store(layer: int) -> None:
        _store_v[(v.shape[0],)](v, cache[layer], slots, LAYOUT=layout, HEADS=HEADS, DIM=DIM, BLOCK=BLOCK,
                                num_warps=4)  # fmt: skip

    store(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            store(layer)
    return triton.testing.do_bench(graph.replay, warmup=10, rep=200) * 1e3 / LAYERS


def main() -> None:
    assert torch.cuda.is_available(), "the store benchmark needs a CUDA device"
    cache = torch.zeros(LAYERS, NUM_BLOCKS * BLOCK * HEADS * DIM, dtype=torch.float8_e4m3fn, device="cuda")
    for batch in (256, 128, 64):
        gen = torch.Generator().manual_seed(batch)
        v = torch.randn(batch, HEADS, DIM, generator=gen).to(torch.float8_e4m3fn).cuda()
        blocks = torch.randperm(NUM_BLOCKS, generator=gen)[:batch]
        slots = (blocks * BLOCK + torch.randint(0, BLOCK, (batch,), generator=gen)).cuda()
        for layout, name in enumerate(LAYOUTS):
            us = time_layout(cache, v, slots, layout)
            print(f"store batch {batch:>3} {name:<22}: {us:6.2f} us a layer")


if __name__ == "__main__":
    main()
