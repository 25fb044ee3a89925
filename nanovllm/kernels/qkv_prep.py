"""From the fused q/k/v projection to attention's inputs in one kernel (Triton).

Between ``qkv_proj`` and attention a layer does, per token: split q, k and v; RMSNorm each q and
k head (Qwen3); rotary on q and k; write k and v into the paged cache. Unfused that is five small
kernels per layer, and at batch 1 each costs its launch, not its bytes (H100, Qwen3-0.6B shapes:
~6.8 us of ~48 us per layer). Here one program per token does it all::

    row of qkv:  | q head 0 | ... | q head H-1 | k head 0 | ... | v head 0 | ... |
                   norm + rotary -> q_out        norm + rotary    as is
                                                 -> k_cache[slot] -> v_cache[slot]

Each head is read as its two rotary halves, so the rotation pairs element ``i`` with ``i + D/2``
without a shuffle. The rounding follows the unfused torch path (``reference.qkv_prep_ref``):
normalised in float32, rounded to the model dtype, times the weight and rounded again, rotated in
float32 and rounded once more. The cache write is ``store_kvcache``'s: slot -1 writes nothing, an
fp8 cache gets ``x * (1 / scale)`` saturated to +-448.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels import pdl
from nanovllm.kernels.decode_attention import check_kv_caches
from nanovllm.kernels.pdl import wait_for_previous
from nanovllm.kernels.store_kvcache import quantize_fp8, slot_offsets


@triton.jit
def _qkv_prep_kernel(
    qkv_ptr,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    positions_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_position, head_dim] float32: cos in the first half, sin in the second
    q_weight_ptr,  # [head_dim] (QK_NORM only)
    k_weight_ptr,
    q_out_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    k_scale_ptr,  # [1] float32 (fp8 caches only)
    v_scale_ptr,
    eps,
    stride_t,
    stride_cos,
    stride_ot,
    stride_oh,
    stride_cb,  # the K cache's strides (head_dim stride 1)
    stride_cs,
    stride_ch,
    stride_vb,  # the V cache's (key-major for fp8 on the GPU: see reference.py)
    stride_vs,
    stride_vh,
    stride_vd,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,  # num_heads + 2 * num_kv_heads rounded up to a power of two
    KV_ROWS: tl.constexpr,  # num_kv_heads rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,
    V_BLOCK: tl.constexpr,  # the V cache's block: BLOCK_SIZE, or fewer key-major (reference.key_major)
    QK_NORM: tl.constexpr,
    FP8: tl.constexpr,
    PDL: tl.constexpr,  # launched early (kernels/pdl.py)
):
    wait_for_previous(PDL)  # qkv comes from the projection just before
    token = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, half)
    is_q = rows < NUM_HEADS
    is_k = (rows >= NUM_HEADS) & (rows < NUM_HEADS + NUM_KV_HEADS)
    row_ok = (is_q | is_k)[:, None]  # V rows are read below, on their own
    dtype = qkv_ptr.dtype.element_ty

    src = qkv_ptr + token * stride_t + rows[:, None] * HEAD_DIM + dims[None, :]
    x1 = tl.load(src, mask=row_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=row_ok, other=0.0).to(tl.float32)

    if QK_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)
        q_w1 = tl.load(q_weight_ptr + dims).to(tl.float32)[None, :]
        q_w2 = tl.load(q_weight_ptr + half + dims).to(tl.float32)[None, :]
        k_w1 = tl.load(k_weight_ptr + dims).to(tl.float32)[None, :]
        k_w2 = tl.load(k_weight_ptr + half + dims).to(tl.float32)[None, :]
        w1 = tl.where(is_q[:, None], q_w1, k_w1)
        w2 = tl.where(is_q[:, None], q_w2, k_w2)
        x1 = ((x1 * inv_rms[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * inv_rms[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)

    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + position * stride_cos + dims)[None, :]
    sin = tl.load(cos_sin_ptr + position * stride_cos + half + dims)[None, :]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin

    q_dst = q_out_ptr + token * stride_ot + rows[:, None] * stride_oh + dims[None, :]
    tl.store(q_dst, r1.to(dtype), mask=is_q[:, None])
    tl.store(q_dst + half, r2.to(dtype), mask=is_q[:, None])

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        # K is rounded to the model dtype first, as the unfused path stores it (fp8: then quantised).
        k1, k2 = r1.to(dtype).to(tl.float32), r2.to(dtype).to(tl.float32)
        if FP8:
            k1, k2 = quantize_fp8(k1, k_scale_ptr), quantize_fp8(k2, k_scale_ptr)
        k_dst = slot_offsets(slot, rows - NUM_HEADS, dims, stride_cb, stride_cs, stride_ch, 1, BLOCK_SIZE)
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + k_dst, k1.to(cache_dtype), mask=is_k[:, None])
        tl.store(k_cache_ptr + k_dst + half, k2.to(cache_dtype), mask=is_k[:, None])
        # V is stored as it is, read again on its own (from L1): a chain apart from q and k lets
        # Triton change its layout for the key-major V store on the loaded values. Sharing the
        # rows above, the change fell on the fp8 tensor, and Triton 3.6 scrambled bytes converting
        # it through stmatrix (H200: a third of the stored bytes wrong).
        v_heads = tl.arange(0, KV_ROWS)
        v_dims = tl.arange(0, HEAD_DIM)
        v_ok = (v_heads < NUM_KV_HEADS)[:, None]
        v_src = qkv_ptr + token * stride_t + (NUM_HEADS + NUM_KV_HEADS + v_heads)[:, None] * HEAD_DIM
        v = tl.load(v_src + v_dims[None, :], mask=v_ok, other=0.0).to(tl.float32)
        if FP8:
            v = quantize_fp8(v, v_scale_ptr)
        v_dst = slot_offsets(slot, v_heads, v_dims, stride_vb, stride_vs, stride_vh, stride_vd, V_BLOCK)
        tl.store(v_cache_ptr + v_dst, v.to(cache_dtype), mask=v_ok)


def qkv_prep(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim] float32, [cos | sin]
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = skip
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]; both or neither
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # q: [num_tokens, num_heads, head_dim]
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[3]
    rows = num_heads + 2 * num_kv_heads
    assert qkv.shape[1] == rows * head_dim and qkv.stride(1) == 1, "qkv: one contiguous row per token"
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    check_kv_caches(k_cache, v_cache)
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert (q_norm_weight is None) == (k_norm_weight is None)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (k_scale is not None and v_scale is not None), "an fp8 KV cache needs its scales"
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    qk_norm = q_norm_weight is not None
    _qkv_prep_kernel[(num_tokens,)](
        qkv, positions, cos_sin_cache,
        q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv,  # unread without norms
        q, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else qkv, v_scale if fp8 else qkv,  # unread unless fp8
        eps,
        qkv.stride(0), cos_sin_cache.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride(),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        ROWS=triton.next_power_of_2(rows),
        KV_ROWS=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=k_cache.shape[1],
        V_BLOCK=v_cache.shape[1],
        QK_NORM=qk_norm,
        FP8=fp8,
        num_warps=4,
        **pdl.launch_options(qkv),
    )  # fmt: skip
    return q
