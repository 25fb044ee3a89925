"""flash-attn as an attention backend, used when the ``flash_attn`` package imports.

flash-attn reads the same paged layout ([num_blocks, block_size, num_kv_heads, head_dim]) through
``block_table``; its paged kernels need a block size that is a multiple of 256.
"""

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

try:  # flash-attn has no paged store of its own; ours is Triton, which CUDA builds of torch ship
    from nanovllm.kernels.store_kvcache import store_kvcache
except ImportError:
    from nanovllm.kernels.reference import store_kvcache_ref as store_kvcache


class FlashAttnBackend:
    name = "flash-attn"
    qkv_prep = None

    @staticmethod
    def v_key_major(cache_dtype: torch.dtype) -> bool:
        return False  # flash-attn reads the slot-major layout (and no fp8 cache)

    @staticmethod
    def store(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        assert k_cache.dtype != torch.float8_e4m3fn, "flash-attn reads no fp8 KV cache (Config rejects it)"
        store_kvcache(key, value, k_cache, v_cache, slot_mapping)

    @staticmethod
    def prefill(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        cu_seqlens_k = torch.nn.functional.pad(ctx.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(
            q, k_cache, v_cache,
            cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_context_len,
            softmax_scale=scale, causal=True, block_table=ctx.block_tables,
        )  # fmt: skip

    @staticmethod
    def decode(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        out = flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache,
            cache_seqlens=ctx.context_lens, block_table=ctx.block_tables, softmax_scale=scale, causal=True,
        )  # fmt: skip
        return out.squeeze(1)
