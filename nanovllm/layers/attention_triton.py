"""The project's own Triton kernels as an attention backend (the default on CUDA without flash-attn)."""

import torch

from nanovllm.kernels.decode_attention import choose_num_splits, paged_decode_attention
from nanovllm.kernels.prefill_attention import paged_prefill_attention
from nanovllm.kernels.qkv_prep import qkv_prep as _qkv_prep
from nanovllm.kernels.store_kvcache import store_kvcache
from nanovllm.utils.buckets import decode_batch_bucket


class TritonBackend:
    name = "triton"
    qkv_prep = staticmethod(_qkv_prep)  # norms + rotary + store in one kernel (kernels/qkv_prep.py)

    @staticmethod
    def v_key_major(cache_dtype: torch.dtype) -> bool:
        """An fp8 V cache is laid out key-major: the decode kernel's ``p @ v`` then reads its tiles
        untransposed (kernels/decode_attention.py, where the measurements are)."""
        return cache_dtype == torch.float8_e4m3fn

    @staticmethod
    def store(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    @staticmethod
    def prefill(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        """A step with prefill chunks. Its leading decodes (``ctx.num_decodes``) go through the decode
        kernel, which reads each KV head once for its whole query group: in the prefill kernel a
        one-token sequence takes a 128-row tile per query head. Measured on an H100 (reference
        workload, 256 sequences): mixed steps of ~4,000 prefill tokens beside ~130 decodes spent
        ~16 ms of their ~24 ms in the prefill kernel."""
        d = ctx.num_decodes
        if d == 0:
            return paged_prefill_attention(
                q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, scale,
                ctx.max_seqlen_q, k_scale, v_scale,
            )  # fmt: skip
        out = torch.empty_like(q)
        # The prefill sequences keep their offsets into q (cu_seqlens_q[d] == d): views, no copies.
        paged_prefill_attention(
            q, k_cache, v_cache, ctx.cu_seqlens_q[d:], ctx.context_lens[d:], ctx.block_tables[d:], scale,
            ctx.max_seqlen_q, k_scale, v_scale, out=out,
        )  # fmt: skip
        paged_decode_attention(
            q[:d], k_cache, v_cache, ctx.block_tables[:d], ctx.context_lens[:d], scale, ctx.max_context_len,
            k_scale=k_scale, v_scale=v_scale, out=out[:d], order=ctx.decode_order,
        )  # fmt: skip
        return out

    @staticmethod
    def decode(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        # The split count depends only on the graph bucket and the context bound, so a batch run
        # eagerly and the same batch replayed in a CUDA graph do identical arithmetic.
        splits = choose_num_splits(decode_batch_bucket(q.shape[0]), k_cache.shape[2], ctx.max_context_len)
        return paged_decode_attention(
            q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, ctx.max_context_len, splits,
            k_scale, v_scale, order=ctx.decode_order,
        )  # fmt: skip
