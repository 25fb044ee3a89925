"""The fused norm + rotary + KV-store kernel against its torch reference, and the reference against the
model's own unfused layers (RMSNorm, RotaryEmbedding, store_kvcache_ref)."""

import pytest
import torch

from tests.kernels.paged_kv import device, v_sub_block

pytest.importorskip("triton")

from nanovllm.kernels.qkv_prep import qkv_prep  # noqa: E402
from nanovllm.kernels.reference import FP8_DTYPE, in_blocks_of, qkv_prep_ref, store_kvcache_ref, to_key_major  # noqa: E402
from nanovllm.layers.layernorm import RMSNorm  # noqa: E402
from nanovllm.layers.rotary_embedding import RotaryEmbedding  # noqa: E402


def make_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype, qk_norm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dev = device()
    rows = num_heads + 2 * num_kv_heads
    qkv = (3 * torch.randn(num_tokens, rows * head_dim, generator=gen)).to(dtype).to(dev)
    positions = torch.randint(0, 4000, (num_tokens,), generator=gen).to(dev)
    rope = RotaryEmbedding(head_dim, 4096, 1e6).to(dev)
    num_blocks = (num_tokens + block_size - 1) // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::4] = -1  # padding tokens write nothing
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(dev)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(dev)
    weights = (None, None)
    if qk_norm:
        weights = (1 + 0.5 * torch.randn(2, head_dim, generator=gen)).to(dtype).to(dev).unbind(0)
    return qkv, positions, rope, k_cache, v_cache, slots.to(dev), weights


def run_both(
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    cache_dtype,
    qk_norm,
    kv_scales=(1, 1),
    v_key_major=False,
):
    qkv, positions, rope, k_cache, v_cache, slots, (q_w, k_w) = make_case(
        19, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype, qk_norm, seed=block_size
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    if v_key_major:  # the kernel writes a key-major V (reference.key_major), the reference a plain one
        v_cache = to_key_major(v_cache, v_sub_block(block_size))
    scales = [torch.tensor([s], device=qkv.device) for s in kv_scales]
    args = (qkv, positions, rope.cos_sin_cache, num_heads, num_kv_heads)
    q = qkv_prep(*args, k_cache, v_cache, slots, q_w, k_w, 1e-6, *scales)
    q_ref = qkv_prep_ref(*args, k_ref, v_ref, slots, q_w, k_w, 1e-6, *scales)
    return (q, k_cache, in_blocks_of(v_cache, block_size)), (q_ref, k_ref, v_ref)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (3, 1)])  # 3 + 2 rows: padding rows
@pytest.mark.parametrize("v_key_major", [False, True])
def test_qkv_prep(qk_norm, dtype, num_heads, num_kv_heads, v_key_major):
    # 32-slot blocks: a key-major V's are 16 (paged_kv.v_sub_block)
    got, want = run_both(num_heads, num_kv_heads, 32, 32, dtype, dtype, qk_norm, v_key_major=v_key_major)
    # float32: the same arithmetic up to fused multiply-adds; float16: at most one rounding step apart
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), **tol)


def test_qkv_prep_ref_is_the_model_layers():
    """The oracle itself: the model's RMSNorm and RotaryEmbedding modules, then the reference store."""
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    qkv, positions, rope, k_cache, v_cache, slots, (q_w, k_w) = make_case(
        9, num_heads, num_kv_heads, head_dim, 16, torch.float32, torch.float32, True
    )
    k_layers, v_layers = k_cache.clone(), v_cache.clone()
    args = (qkv, positions, rope.cos_sin_cache, num_heads, num_kv_heads)
    q_ref = qkv_prep_ref(*args, k_cache, v_cache, slots, q_w, k_w)
    q_norm, k_norm = RMSNorm(head_dim).to(qkv.device), RMSNorm(head_dim).to(qkv.device)
    q_norm.weight.data.copy_(q_w)
    k_norm.weight.data.copy_(k_w)
    q, k, v = qkv.view(9, -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    q, k = rope(positions, q_norm(q), k_norm(k))
    store_kvcache_ref(k, v, k_layers, v_layers, slots)
    torch.testing.assert_close(q_ref, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, k_layers, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache, v_layers, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(128, 16, 8), (128, 32, 8), (64, 14, 2)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_DTYPE])
def test_qkv_prep_gpu(qk_norm, head_dim, num_heads, num_kv_heads, cache_dtype):
    got, want = run_both(
        num_heads, num_kv_heads, head_dim, 256, torch.bfloat16, cache_dtype, qk_norm, kv_scales=(0.5, 0.25),
        v_key_major=cache_dtype == FP8_DTYPE,  # as the engine lays out an fp8 cache
    )  # fmt: skip
    # bf16 results may sit one rounding step apart (fused multiply-adds change the last bit)
    for g, w in zip(got, want, strict=True):
        if g.dtype != FP8_DTYPE:
            torch.testing.assert_close(g.float(), w.float(), atol=6e-2, rtol=1e-2)
            continue
        # fp8: the same bf16 value quantised the same way, unless that last bit crossed a rounding
        # boundary of fp8 (one step, 1/8 relative): rare, and never more than one step
        differ = g.view(torch.uint8) != w.view(torch.uint8)
        assert differ.float().mean() < 1e-3
        torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=0.13)
