import pytest
import torch

from tests.kernels.paged_kv import device

pytest.importorskip("triton")

from nanovllm.kernels.reference import store_kvcache_ref  # noqa: E402
from nanovllm.kernels.store_kvcache import store_kvcache  # noqa: E402


def run_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype, seed=0):
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
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    store_kvcache_ref(key, value, k_ref, v_ref, slot_mapping)
    # A copy (with at most one round-to-nearest cast): bit-exact, untouched slots included.
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)],
)
@pytest.mark.parametrize("num_kv_heads", [1, 3])  # 3: a head count that is not a power of two
def test_store_kvcache(block_size, dtype, cache_dtype, num_kv_heads):
    run_case(
        37, 2 * num_kv_heads, num_kv_heads, 32, block_size, dtype, cache_dtype, seed=block_size + num_kv_heads
    )


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_store_kvcache_gpu(block_size, dtype, head_dim):
    run_case(4096, 16, 8, head_dim, block_size, dtype, dtype, seed=block_size + head_dim)
