import pytest
import torch

from tests.kernels.paged_kv import device, v_sub_block

pytest.importorskip("triton")

from nanovllm.kernels.reference import FP8_DTYPE, key_major, quantize_fp8_ref, store_kvcache_ref, to_key_major  # noqa: E402
from nanovllm.kernels.store_kvcache import store_kvcache  # noqa: E402


def run_case(
    num_tokens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    cache_dtype,
    seed=0,
    kv_scales=(1.0, 1.0),
    v_key_major=False,  # V laid out key-major, as the GPU's fp8 cache (reference.key_major)
):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = (num_tokens + block_size - 1) // block_size + 3
    # K and V as views into a fused qkv projection output: a stride on dim 0 only.
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(dtype).to(device())
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens (e.g. CUDA-graph batch padding) write nothing
    slot_mapping = slots.to(torch.int32 if seed % 2 else torch.int64).to(device())
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(device())
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(device())
    if v_key_major:
        v_cache = to_key_major(v_cache, v_sub_block(block_size))
    k_ref, v_ref = k_cache.clone(), v_cache.contiguous()
    k_scale, v_scale = (torch.tensor([s], device=device()) for s in kv_scales)
    store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    store_kvcache_ref(key, value, k_ref, v_ref, slot_mapping, k_scale, v_scale)
    # A copy with at most one round-to-nearest cast (fp8: after a correctly rounded division and
    # saturation, as in the reference): bit-exact, untouched slots included.
    as_bits = lambda t: t.view(torch.uint8) if t.dtype == FP8_DTYPE else t
    torch.testing.assert_close(as_bits(k_cache), as_bits(k_ref), atol=0, rtol=0)
    torch.testing.assert_close(as_bits(v_cache), as_bits(v_ref), atol=0, rtol=0)


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)],
)
@pytest.mark.parametrize("num_kv_heads", [1, 3])  # 3: a head count that is not a power of two
@pytest.mark.parametrize("v_key_major", [False, True])
def test_store_kvcache(block_size, dtype, cache_dtype, num_kv_heads, v_key_major):
    run_case(
        37, 2 * num_kv_heads, num_kv_heads, 32, block_size, dtype, cache_dtype,
        seed=block_size + num_kv_heads, v_key_major=v_key_major,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_store_kvcache_gpu(block_size, dtype, head_dim):
    run_case(4096, 16, 8, head_dim, block_size, dtype, dtype, seed=block_size + head_dim)


@pytest.mark.gpu  # Triton 3.6's interpreter rounds float -> fp8 casts wrongly; the GPU converts exactly.
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.05, 0.002)])  # 0.002: many values saturate
@pytest.mark.parametrize("v_key_major", [False, True])
def test_store_kvcache_fp8_gpu(block_size, dtype, kv_scales, v_key_major):
    run_case(4096, 16, 8, 128, block_size, dtype, FP8_DTYPE, seed=block_size, kv_scales=kv_scales,
             v_key_major=v_key_major)  # fmt: skip


@pytest.mark.parametrize("v_key_major", [False, True])
def test_store_kvcache_fp8_never_writes_nan(v_key_major):
    """NaN is stored as 0 and +-inf saturates: the decode kernel reads stale slots whole and relies
    on a finite cache (decode_attention.py, ONE_LOOP). Exact values, so the interpreter runs it too."""
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -0.0, 2.0])
    key = specials.repeat(2 * 16 // 6 + 1)[: 2 * 16].view(1, 2, 16).repeat(3, 1, 1).to(device())
    value = key.flip(-1).contiguous()
    shape = (2, 32, 2, 16)  # a key-major V: 4 blocks of 16
    k_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=device())
    v_cache = key_major(torch.zeros_like(k_cache), 16) if v_key_major else torch.zeros_like(k_cache)
    scale = torch.tensor([0.5], device=device())
    store_kvcache(key, value, k_cache, v_cache, torch.tensor([3, 37, 60], device=device()), scale, scale)
    for cache, src in ((k_cache, key), (v_cache, value)):
        got = cache.float().flatten(0, 1)[[3, 37, 60]]
        want = torch.where(src.isnan(), 0.0, src * 2).clamp(-448, 448)
        assert not cache.float().isnan().any()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_quantize_fp8_saturates_and_rounds_to_nearest():
    scale = torch.tensor([0.5])
    x = torch.tensor([0.0, 1.0, -3.3, 224.0, 300.0, -1e6, float("inf"), float("-inf"), 1e-4, float("nan")])
    q = quantize_fp8_ref(x, scale).float()
    assert not q.isnan().any()
    assert q.tolist()[:8] == [
        0.0,
        2.0,
        -6.5,
        448.0,
        448.0,
        -448.0,
        448.0,
        -448.0,
    ]  # 6.6 -> 6.5 (3-bit mantissa)
    assert q[8] == 0.0  # 2e-4 is below half of the smallest subnormal (2^-9)
    assert q[9] == 0.0  # NaN is stored as 0: a cache never holds NaN
    # Round-to-nearest: relative error at most 2^-4 over the normal range (mantissa of 3 bits).
    y = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 5
    y = y[(y.abs() >= 2**-6 * 0.1) & (y.abs() <= 448 * 0.1)]  # normal e4m3 values after / 0.1
    back = quantize_fp8_ref(y, torch.tensor([0.1])).float() * 0.1
    assert ((back - y).abs() / y.abs()).max() <= 2**-4 + 1e-6
