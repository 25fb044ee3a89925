"""The project's own Triton kernels as an attention backend (the default on CUDA without flash-attn).

Decode runs the split kernel (kernels/decode_attention.py).
``NANOVLLM_DECODE=flat[:PER_SM[:STAGES[:BLOCK_N[:WARPS]]]]`` runs the flat one instead
(kernels/decode_flat.py): an experiment, off by default until a GPU measures it faster. PER_SM
programs on every SM (default 2), STAGES its loop's pipeline depth (default 5 for fp8, 3
otherwise), BLOCK_N keys a tile (default the split kernel's: 128 for fp8, 64 otherwise; at most a
block), WARPS a program (default 4). The host then plans each step's decode rows
(``Context.decode_plan``).
"""

import functools
import os
from dataclasses import dataclass

import torch

from nanovllm.kernels.decode_attention import choose_num_splits, paged_decode_attention
from nanovllm.kernels.decode_flat import flat_decode_attention
from nanovllm.kernels.flat_plan import device_programs
from nanovllm.kernels.prefill_attention import paged_prefill_attention
from nanovllm.kernels.qkv_prep import qkv_prep as _qkv_prep
from nanovllm.kernels.store_kvcache import store_kvcache
from nanovllm.utils.buckets import decode_batch_bucket


@dataclass(frozen=True)
class FlatSetting:
    per_sm: int = 2
    stages: int | None = None
    block_n: int | None = None
    warps: int | None = None

    def launch(self) -> dict:
        return {k: v for k, v in (("num_stages", self.stages), ("num_warps", self.warps)) if v is not None}


@functools.cache
def flat_setting() -> FlatSetting | None:
    """``NANOVLLM_DECODE`` read once: None for the split kernel, else the flat kernel's setting."""
    value = os.environ.get("NANOVLLM_DECODE", "split")
    if value == "split":
        return None
    name, *numbers = value.split(":")
    if name != "flat" or len(numbers) > 4 or not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise ValueError(
            f"NANOVLLM_DECODE={value!r}: use 'split' (the default) or "
            "'flat[:PROGRAMS_PER_SM[:STAGES[:BLOCK_N[:WARPS]]]]', e.g. 'flat' or 'flat:2:5'"
        )
    setting = FlatSetting(*map(int, numbers))
    n = setting.block_n
    if n is not None and (n < 16 or n & (n - 1)):
        raise ValueError(f"NANOVLLM_DECODE={value!r}: BLOCK_N must be a power of two from 16, got {n}")
    return setting


class TritonBackend:
    name = "triton"
    qkv_prep = staticmethod(_qkv_prep)  # norms + rotary + store in one kernel (kernels/qkv_prep.py)

    @staticmethod
    def decode_plan_shape(cache_dtype: torch.dtype, num_kv_heads: int, block_size: int, device: torch.device):
        """(keys a tile, programs) of the flat decode kernel's plans, or None for the split kernel."""
        setting = flat_setting()
        if setting is None:
            return None
        # The split kernel's tiles unless set, at most one block (a power of two from 16: Config checks it).
        block_n = setting.block_n or (128 if cache_dtype == torch.float8_e4m3fn else 64)
        return min(block_n, block_size), device_programs(device, num_kv_heads, setting.per_sm)

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
        if ctx.decode_plan is not None:
            flat_decode_attention(q[:d], k_cache, v_cache, ctx.decode_plan, scale, k_scale, v_scale,
                                  out=out[:d], launch=flat_setting().launch())  # fmt: skip
            return out
        paged_decode_attention(
            q[:d], k_cache, v_cache, ctx.block_tables[:d], ctx.context_lens[:d], scale, ctx.max_context_len,
            k_scale=k_scale, v_scale=v_scale, out=out[:d], order=ctx.decode_order,
        )  # fmt: skip
        return out

    @staticmethod
    def decode(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        if ctx.decode_plan is not None:
            return flat_decode_attention(q, k_cache, v_cache, ctx.decode_plan, scale, k_scale, v_scale,
                                         launch=flat_setting().launch())  # fmt: skip
        # The split count depends only on the graph bucket and the context bound, so a batch run
        # eagerly and the same batch replayed in a CUDA graph do identical arithmetic.
        splits = choose_num_splits(decode_batch_bucket(q.shape[0]), k_cache.shape[2], ctx.max_context_len)
        return paged_decode_attention(
            q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, ctx.max_context_len, splits,
            k_scale, v_scale, order=ctx.decode_order,
        )  # fmt: skip
