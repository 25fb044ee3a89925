"""Write the new tokens' K and V into the paged cache (Triton).

One program per new token: it reads the token's slot from ``slot_mapping`` (slot -1 = padding, the
program writes nothing) and copies all its KV heads, K and V, into row ``slot % block_size`` of
block ``slot // block_size``. See ``reference.py`` for the cache layout.

An fp8 cache gets ``x * (1 / scale)`` saturated to +-448 (float8_e4m3fn has no inf: an unsaturated
cast of a large value would be NaN), NaN stored as 0, so the cache never holds NaN; the reciprocal
is correctly rounded once a program so the result is bit-identical to ``reference.quantize_fp8_ref``.
Triton 3.6's interpreter rounds float -> fp8 casts wrongly (a mantissa carry can halve the value,
subnormals flush to zero), so the fp8 store is tested on a GPU.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.decode_attention import check_kv_caches


@triton.jit
def quantize_fp8(x, scale_ptr):
    """``x * (1 / scale)`` in float32, saturated to +-448, NaN as 0: ready for the cast to
    float8_e4m3fn, never NaN (the decode kernel relies on it: see decode_attention.py).
    One IEEE division a program: an IEEE division per element compiled to a branch and a slow-path
    call each, serialised (qkv_prep at batch 8 took 13 us where its bf16 twin took 7, H200)."""
    scale = tl.load(scale_ptr + tl.arange(0, 1))
    inv_scale = tl.math.div_rn(tl.full([1], 1.0, tl.float32), scale)
    x = x.to(tl.float32)
    return tl.clamp(tl.where(x == x, x, 0.0) * inv_scale, -448.0, 448.0)


@triton.jit
def slot_offsets(slot, heads, dims, stride_b, stride_s, stride_h, stride_d, BLOCK: tl.constexpr):
    """Where one token's [heads, dims] lie in a cache of BLOCK-slot blocks with these strides: row
    ``slot % BLOCK`` of block ``slot // BLOCK`` (a key-major V's blocks may be smaller than K's,
    reference.key_major). ``slot`` is int64: block * stride_b overflows int32 on caches of more
    than 2 G elements. Shared with qkv_prep."""
    block, row = slot // BLOCK, slot % BLOCK
    return block * stride_b + row * stride_s + heads[:, None] * stride_h + dims[None, :] * stride_d


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any strides
    value_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    k_scale_ptr,  # [1] float32 (fp8 caches only)
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,  # the K cache's strides
    stride_cs,
    stride_ch,
    stride_cd,
    stride_cvb,  # the V cache's (key-major for fp8 on the GPU: see reference.py)
    stride_cvs,
    stride_cvh,
    stride_cvd,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    V_BLOCK: tl.constexpr,  # the V cache's block: BLOCK_SIZE, or fewer key-major (reference.key_major)
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # num_kv_heads rounded up to a power of two
    FP8: tl.constexpr,  # the cache is float8_e4m3fn: quantise with the scales
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = heads[:, None] < num_kv_heads

    key = tl.load(
        key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask
    )
    value = tl.load(
        value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd, mask=mask
    )
    if FP8:
        key = quantize_fp8(key, k_scale_ptr)
        value = quantize_fp8(value, v_scale_ptr)
    k_dst = slot_offsets(slot, heads, dims, stride_cb, stride_cs, stride_ch, stride_cd, BLOCK_SIZE)
    v_dst = slot_offsets(slot, heads, dims, stride_cvb, stride_cvs, stride_cvh, stride_cvd, V_BLOCK)
    tl.store(k_cache_ptr + k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = skip
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    check_kv_caches(k_cache, v_cache)
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (k_scale is not None and v_scale is not None), "an fp8 KV cache needs its scales"
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,  # unread unless fp8
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1],
        V_BLOCK=v_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        FP8=fp8,
    )  # fmt: skip
