"""The project's own Triton kernels as an attention backend (the default on CUDA without flash-attn)."""

from nanovllm.kernels.decode_attention import choose_num_splits, paged_decode_attention
from nanovllm.kernels.prefill_attention import paged_prefill_attention
from nanovllm.kernels.qkv_prep import qkv_prep as _qkv_prep
from nanovllm.kernels.store_kvcache import store_kvcache
from nanovllm.utils.buckets import decode_batch_bucket


class TritonBackend:
    name = "triton"
    qkv_prep = staticmethod(_qkv_prep)  # norms + rotary + store in one kernel (kernels/qkv_prep.py)

    @staticmethod
    def store(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    @staticmethod
    def prefill(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        return paged_prefill_attention(
            q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, scale,
            ctx.max_seqlen_q, k_scale, v_scale,
        )  # fmt: skip

    @staticmethod
    def decode(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        # The split count depends only on the graph bucket and the context bound, so a batch run
        # eagerly and the same batch replayed in a CUDA graph do identical arithmetic.
        splits = choose_num_splits(decode_batch_bucket(q.shape[0]), k_cache.shape[2], ctx.max_context_len)
        return paged_decode_attention(
            q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, ctx.max_context_len, splits,
            k_scale, v_scale,
        )  # fmt: skip
