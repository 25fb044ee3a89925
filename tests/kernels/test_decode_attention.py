import pytest
import torch

from tests.kernels.paged_kv import device, make_paged_kv

pytest.importorskip("triton")

from nanovllm.kernels.decode_attention import paged_decode_attention  # noqa: E402
from nanovllm.kernels.reference import FP8_DTYPE, paged_decode_attention_ref  # noqa: E402

# Reference and kernel both accumulate in fp32, in a different order. The kernel also rounds the
# softmax weights to the input dtype before the P @ V matmul (as flash attention does), and both
# round the output to the input dtype: a few units in the last place of the output dtype.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),  # summation order only
    torch.float16: dict(atol=4e-3, rtol=4e-3),  # fp16 P (11-bit mantissa) + fp16 output rounding
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),  # bf16 P (8-bit mantissa) + bf16 output rounding
}
# An fp8 cache: kernel and reference read the same fp8 values (the interpreter's fp8 -> float upcast
# is exact), upcast exactly to the query dtype, so the tolerance is the query dtype's above.
KV_SCALES = [(1.0, 1.0), (0.05, 0.02)]  # unit (many subnormals) and calibrated-like scales


def check(
    context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, pad="poison",
    cache_dtype=None, kv_scales=(1.0, 1.0), v_key_major=False, **kwargs,
):  # fmt: skip
    """The kernel against the reference on one cache. A key-major V cache (fp8, as the engine's)
    holds 448, the largest fp8 value, in the stale slots past each sequence's end: the kernel
    reads them whole and must give them weight 0. (Never NaN: the quantiser stores NaN as
    0, test_store_kvcache.py.) The reference reads the same values laid out slot-major."""
    cache = lambda **kw: make_paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, cache_dtype or dtype, pad=pad,
        seed=len(context_lens), kv_scales=kv_scales, **kw,
    )  # fmt: skip
    k_cache, v_cache, block_tables, lens = cache()
    v_read = cache(v_key_major=True)[1] if v_key_major else v_cache
    k_scale, v_scale = (torch.tensor([s], device=device()) for s in kv_scales)
    gen = torch.Generator().manual_seed(1)
    # q as a view into a wider projection output: a stride on dim 0.
    q_wide = torch.randn(len(context_lens), num_heads + 2, head_dim, generator=gen).to(dtype).to(device())
    q = q_wide[:, :num_heads]
    scale = head_dim**-0.5
    out = paged_decode_attention(
        q, k_cache, v_read, block_tables, lens, scale, k_scale=k_scale, v_scale=v_scale, **kwargs
    )
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, scale, k_scale, v_scale)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


# Lengths around block boundaries: 1, one short of a block, exactly one block, one past it.
def lens_around(block_size: int) -> list[int]:
    return [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 7]


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode(block_size, group, dtype):
    check(lens_around(block_size), 2 * group, 2, 32, block_size, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])  # 16 > tiles of the short sequences: empty splits
@pytest.mark.parametrize("block_n", [16, 64])  # 16: every sequence but the first spans several splits
def test_decode_splits(num_splits, block_n):
    check([1, 17, 100, 300], 4, 2, 64, 32, torch.float32, num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_longest_first(num_splits):
    """``order`` only changes which program takes which row (the engine passes the rows longest
    context first): every row's output is still its own."""
    lens = [5, 300, 17, 129, 1, 64]
    rows = sorted(range(len(lens)), key=lambda i: -lens[i])
    order = torch.tensor([rows, [lens[i] for i in rows]], dtype=torch.int32, device=device())
    check(lens, 4, 2, 32, 16, torch.float32, num_splits=num_splits, block_n=16, order=order)


def test_merge_leaves_every_counter_at_zero():
    """The splits of a (sequence, KV head) count their arrivals; the last merges and resets the count, so
    the next launch (the next layer, the next graph replay) starts from zero. A count left behind would
    make a later launch merge before its splits are done, or never."""
    from nanovllm.kernels import decode_attention

    for splits in (3, 7):
        check([40, 300, 129, 1], 8, 4, 32, 16, torch.float32, num_splits=splits, block_n=16)
        assert int(decode_attention._counters_for(torch.device(device())).abs().sum()) == 0


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype,group", [(torch.float32, 4), (torch.float16, 1)])
@pytest.mark.parametrize("kv_scales", KV_SCALES)
@pytest.mark.parametrize("v_key_major", [False, True])
def test_decode_fp8(block_size, dtype, group, kv_scales, v_key_major):
    check(
        lens_around(block_size), 2 * group, 2, 32, block_size, dtype, cache_dtype=FP8_DTYPE,
        kv_scales=kv_scales, v_key_major=v_key_major,
    )  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("v_key_major", [False, True])
def test_decode_fp8_splits(num_splits, v_key_major):  # v_scale is applied to each split's partial first
    check(
        [1, 17, 100, 300], 4, 2, 64, 32, torch.float32, cache_dtype=FP8_DTYPE, kv_scales=(0.1, 0.03),
        num_splits=num_splits, v_key_major=v_key_major,
    )  # fmt: skip


@pytest.mark.parametrize("block_n", [16, 32])  # 32: the whole-tile path (tiles inside a block)
def test_decode_fp8_key_major_tiles(block_n):
    """Key-major V with tiles of one block (32: every tile in the one pipelined loop, masked) and
    of several, split or not, the largest fp8 value in the stale slots."""
    for splits in (1, 4):
        check([1, 31, 32, 33, 95, 200], 4, 2, 32, 32, torch.float32, cache_dtype=FP8_DTYPE,
              v_key_major=True, num_splits=splits, block_n=block_n)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_fp8_warp_split(dtype, num_splits):
    """Each 64-key tile in 4 sub-tiles of 16 keys, each with its own softmax, merged at the end: the
    same function. Some warps never see a key (a max of -inf there must not become NaN): three with
    lengths 1 and 5, two with 17, and with 3 splits the last split of 130 (its 2 keys)."""
    check(
        [1, 5, 17, 63, 64, 65, 130, 300], 4, 2, 32, 64, dtype, cache_dtype=FP8_DTYPE, kv_scales=(0.1, 0.03),
        v_key_major=True, num_splits=num_splits, block_n=64, launch={"warp_split": 4},
    )  # fmt: skip


def test_decode_warp_split_needs_the_one_loop_layout():
    split = {"warp_split": 4}
    with pytest.raises(AssertionError, match="warp_split"):  # slot-major V: tiles transposed on the way
        check([5, 40], 4, 2, 32, 64, torch.float32, cache_dtype=FP8_DTYPE, block_n=64, launch=split)
    with pytest.raises(AssertionError, match="warp_split"):  # sub-tiles of 8 keys: below the dot's 16
        check([5, 40], 4, 2, 32, 32, torch.float32, cache_dtype=FP8_DTYPE, v_key_major=True, block_n=32,
              launch=split)  # fmt: skip


@pytest.mark.parametrize("pad", ["-1", "0"])
def test_decode_block_table_padding(pad):
    check([5, 40, 64], 4, 2, 32, 16, torch.float16, pad=pad, max_context_len=64)


QWEN3_0_6B = (128, 16, 8)  # head_dim, num_heads, num_kv_heads


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (7, 1000), (256, 1024), (64, 4096)])
def test_decode_gpu(block_size, dtype, batch, max_len):
    check_random_batch(batch, max_len, *QWEN3_0_6B, block_size, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads", [(128, 32, 8), (64, 8, 8), (128, 16, 2), (64, 16, 4)]
)
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (33, 2000)])
def test_decode_gpu_heads(head_dim, num_heads, num_kv_heads, batch, max_len):
    check_random_batch(batch, max_len, head_dim, num_heads, num_kv_heads, 256, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (7, 1000), (256, 1024), (64, 4096)])
@pytest.mark.parametrize("v_key_major", [False, True])
def test_decode_fp8_gpu(block_size, dtype, batch, max_len, v_key_major):
    check_random_batch(batch, max_len, *QWEN3_0_6B, block_size, dtype, FP8_DTYPE, (0.04, 0.01), v_key_major)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (7, 1000), (256, 1024), (64, 4096)])
@pytest.mark.parametrize("stages", [5, 4])
def test_decode_fp8_warp_split_gpu(batch, max_len, stages):  # as the engine: 256-slot blocks, key-major V
    launch = {"warp_split": 4, "num_stages": stages}
    check_random_batch(
        batch, max_len, *QWEN3_0_6B, 256, torch.bfloat16, FP8_DTYPE, (0.04, 0.01), True, launch=launch
    )  # fmt: skip


def check_random_batch(
    batch,
    max_len,
    head_dim,
    num_heads,
    num_kv_heads,
    block_size,
    dtype,
    cache_dtype=None,
    kv_scales=(1.0, 1.0),
    v_key_major=False,
    **kwargs,
):
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lens[0] = max_len
    check(
        lens, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype=cache_dtype,
        kv_scales=kv_scales, max_context_len=max_len, v_key_major=v_key_major, **kwargs,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_DTYPE])
def test_decode_cuda_graph(cache_dtype):
    """Captured once with a fixed max_context_len, replayed over other context lengths (and, for
    fp8, other scales: the graph reads the scale tensors, it has no value of them baked in)."""
    num_heads, num_kv_heads, head_dim, block_size, max_len = 16, 8, 128, 256, 4096
    batch = 4
    k_cache, v_cache, block_tables, lens = make_paged_kv(
        [max_len] * batch, num_kv_heads, head_dim, block_size, cache_dtype, kv_scales=(0.05, 0.02),
        v_key_major=cache_dtype == FP8_DTYPE,  # as the engine lays out an fp8 cache
    )  # fmt: skip
    k_scale = torch.tensor([0.05], device="cuda")
    v_scale = torch.tensor([0.02], device="cuda")
    q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    run = lambda: paged_decode_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        lens,
        0.1,
        max_context_len=max_len,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for i, new_lens in enumerate(([1, 2, 3, 4], [4096, 1, 255, 257], [1000, 2000, 3000, 4096])):
        lens.copy_(torch.tensor(new_lens, dtype=lens.dtype))
        q.normal_()
        k_scale.fill_(0.05 * (i + 1))
        v_scale.fill_(0.02 / (i + 1))
        graph.replay()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.1, k_scale, v_scale)
        torch.testing.assert_close(out, ref, **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_metadata_views_reuse_the_compiled_kernels():
    """A mixed step passes block-table and length views that start at a later row (not 16-byte
    aligned), and a decode order of its own width: they must run the kernels already built for whole
    tensors and the graphs' order buffer, not build new variants in the middle of a run (the pointers
    and the order's stride are not specialised)."""
    import triton

    from nanovllm.kernels.prefill_attention import paged_prefill_attention
    from nanovllm.kernels.reference import paged_prefill_attention_ref

    lens = [5, 40, 17, 90, 33]
    k_cache, v_cache, block_tables, context_lens = make_paged_kv(lens, 2, 64, 16, torch.bfloat16)
    q = torch.randn(len(lens), 4, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")  # one new token per sequence

    def run(first):
        bt, cl = block_tables[first:], context_lens[first:]
        outs = [
            paged_decode_attention(q[first:], k_cache, v_cache, bt, cl, 0.125, num_splits=s) for s in (1, 3)
        ]
        # longest first: the graphs pass [2, n] of a 16-wide buffer, a mixed step its own [2, n]
        n = len(lens) - first
        rows = sorted(range(n), key=lambda i: -lens[first + i])
        order = torch.zeros(2, 16 if first == 0 else n, dtype=torch.int32, device="cuda")[:, :n]
        order.copy_(torch.tensor([rows, [lens[first + i] for i in rows]]))
        outs += [
            paged_decode_attention(q[first:], k_cache, v_cache, bt, cl, 0.125, num_splits=s, order=order)
            for s in (1, 3)
        ]
        # as a mixed step calls it: q whole, the prefill rows' offsets into it a view of cu_seqlens
        prefill = paged_prefill_attention(
            q, k_cache, v_cache, cu[first:], cl, bt, 0.125, 1, out=torch.zeros_like(q)
        )
        return [*outs, prefill[first:]]

    run(0)  # whole tensors: builds (or loads) the variants
    built = []
    saved = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = lambda **kw: built.append(kw["fn"].name) and False
    try:
        *decodes, prefill = run(1)  # views one int32 row in: 4-byte aligned only
    finally:
        triton.knobs.runtime.jit_cache_hook = saved
    assert built == []
    bt, cl = block_tables[1:], context_lens[1:]
    want = paged_decode_attention_ref(q[1:], k_cache, v_cache, bt, cl, 0.125)
    for got in decodes:
        torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])
    want = paged_prefill_attention_ref(q[1:], k_cache, v_cache, cu[1:] - 1, cl, bt, 0.125)  # one query each
    torch.testing.assert_close(prefill, want, **TOLERANCE[torch.bfloat16])
