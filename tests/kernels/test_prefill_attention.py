import pytest
import torch

from tests.kernels.paged_kv import device, make_paged_kv

pytest.importorskip("triton")

from nanovllm.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from nanovllm.kernels.reference import FP8_DTYPE, paged_prefill_attention_ref  # noqa: E402
from nanovllm.layers.attention_triton import TritonBackend  # noqa: E402
from nanovllm.utils.context import Context  # noqa: E402

# As for decode: fp32 accumulation in both, softmax weights rounded to the input dtype before P @ V
# in the kernel, output rounded to the input dtype in both.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),  # summation order only
    torch.float16: dict(atol=4e-3, rtol=4e-3),  # fp16 P (11-bit mantissa) + fp16 output rounding
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),  # bf16 P (8-bit mantissa) + bf16 output rounding
}
# fp8 caches: both sides read the same fp8 values and upcast them exactly: the query dtype's tolerance.


def check(
    q_lens,
    context_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    pad="poison",
    max_seqlen_q=None,
    cache_dtype=None,
    kv_scales=(1.0, 1.0),
    num_decodes=None,  # run through the Triton backend, its first num_decodes sequences by decode
    v_key_major=False,  # the kernels read V key-major, NaN in its stale slots (as in the decode tests)
):
    cache = lambda **kw: make_paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, cache_dtype or dtype, pad=pad, seed=sum(q_lens),
        kv_scales=kv_scales, **kw,
    )  # fmt: skip
    k_cache, v_cache, block_tables, lens = cache()
    v_read = cache(v_key_major=True, stale=float("nan"))[1] if v_key_major else v_cache
    k_scale, v_scale = (torch.tensor([s], device=device()) for s in kv_scales)
    gen = torch.Generator().manual_seed(2)
    num_tokens = sum(q_lens)
    # q as a view into a fused qkv output: a stride on dim 0.
    qkv = (
        torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device())
    )
    q = qkv[:, :num_heads]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device())
    scale = head_dim**-0.5
    if num_decodes is None:
        out = paged_prefill_attention(
            q, k_cache, v_read, cu, lens, block_tables, scale, max_seqlen_q, k_scale, v_scale
        )
    else:
        assert q_lens[:num_decodes] == [1] * num_decodes
        ctx = Context(
            cu_seqlens_q=cu, max_seqlen_q=max(q_lens), context_lens=lens, max_context_len=max(context_lens),
            block_tables=block_tables, num_decodes=num_decodes,
        )  # fmt: skip
        out = TritonBackend.prefill(q, k_cache, v_read, ctx, scale, k_scale, v_scale)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, lens, block_tables, scale, k_scale, v_scale)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill(block_size, group, dtype):
    # Fresh prompts of lengths around block and tile boundaries, packed into one batch.
    lens = [1, block_size - 1, block_size + 1, 33] if block_size <= 32 else [1, 31, 70]
    check(lens, lens, 2 * group, 2, 32, block_size, dtype)


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_prefix_cached(block_size, dtype):
    # context_len > q_len: cached prefixes (whole blocks, or not, as in chunked prefill), one new token.
    q_lens = [5, 1, 20, 16]
    context_lens = [5 + block_size, 40, 20 + 2 * block_size, 16 + 3]
    check(q_lens, context_lens, 4, 2, 32, block_size, dtype)


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype,group", [(torch.float32, 4), (torch.float16, 1)])
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.05, 0.02)])
@pytest.mark.parametrize("v_key_major", [False, True])
def test_prefill_fp8(block_size, dtype, group, kv_scales, v_key_major):
    # Mixed batch as the engine's chunked prefill builds it: a fresh prompt, a decode (one query
    # behind a cached context), and a chunk continuing a partly cached prompt.
    q_lens, context_lens = [17, 1, 20], [17, block_size + 24, block_size + 20]
    check(
        q_lens, context_lens, 2 * group, 2, 32, block_size, dtype, cache_dtype=FP8_DTYPE, kv_scales=kv_scales,
        v_key_major=v_key_major,
    )  # fmt: skip


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize(
    "dtype,cache_dtype", [(torch.float32, None), (torch.float16, None), (torch.float16, FP8_DTYPE)]
)
def test_mixed_step_decodes_by_the_decode_kernel(block_size, dtype, cache_dtype):
    # The backend's mixed step: three leading decodes through the decode kernel, the rest (a fresh
    # prompt, a chunk behind a cached prefix, a one-token last chunk) through prefill, one output.
    q_lens = [1, 1, 1, 17, 20, 1]
    context_lens = [40, block_size + 17, 5, 17, block_size + 20, 3]
    check(q_lens, context_lens, 4, 2, 32, block_size, dtype, cache_dtype=cache_dtype, kv_scales=(0.5, 0.25),
          num_decodes=3, v_key_major=cache_dtype == FP8_DTYPE)  # fmt: skip


@pytest.mark.parametrize("pad", ["-1", "0"])
def test_prefill_block_table_padding(pad):
    check([3, 16, 9], [19, 16, 40], 4, 4, 64, 16, torch.float16, pad=pad, max_seqlen_q=16)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(128, 16, 8), (64, 8, 2), (128, 8, 8)])
def test_prefill_gpu(block_size, dtype, head_dim, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size)
    q_lens = [1, 127, 128, 129, 1000, 2048] + torch.randint(1, 600, (10,), generator=gen).tolist()
    cached = [0, 0, 256, 3, 1024, 2048] + torch.randint(0, 1000, (10,), generator=gen).tolist()
    context_lens = [q + c for q, c in zip(q_lens, cached, strict=True)]
    check(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
def test_mixed_batch_gpu(block_size):
    # A mixed step as the scheduler builds it: 60 decodes (one query against up to 3,000 cached keys)
    # then prefill chunks that continue cached prefixes, at Qwen3-0.6B's attention shapes.
    gen = torch.Generator().manual_seed(7)
    decode_ctx = torch.randint(1, 3000, (60,), generator=gen).tolist()
    q_lens = [1] * 60 + [512, 200, 1]
    context_lens = decode_ctx + [512 + 1024, 200, 17]
    check(q_lens, context_lens, 16, 8, 128, block_size, torch.bfloat16)
    check(q_lens, context_lens, 16, 8, 128, block_size, torch.bfloat16, num_decodes=60)  # the backend's split


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v_key_major", [False, True])
def test_prefill_fp8_gpu(block_size, dtype, v_key_major):
    # Qwen3-0.6B shapes; a mixed batch: long prompts, chunks behind cached prefixes, decodes (q_len 1).
    gen = torch.Generator().manual_seed(block_size)
    q_lens = [1, 1, 1, 127, 1000, 2048] + torch.randint(1, 600, (10,), generator=gen).tolist()
    cached = [3000, 17, 256, 3, 1024, 0] + torch.randint(0, 1000, (10,), generator=gen).tolist()
    context_lens = [q + c for q, c in zip(q_lens, cached, strict=True)]
    check(q_lens, context_lens, 16, 8, 128, block_size, dtype, cache_dtype=FP8_DTYPE, kv_scales=(0.04, 0.01),
          v_key_major=v_key_major)  # fmt: skip
