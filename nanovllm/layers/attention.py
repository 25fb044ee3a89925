"""Attention over the paged KV cache, behind a backend chosen once at start-up.

Every backend implements three calls on the same logical cache layout (kernels/reference.py):
``store`` writes the step's new K/V through the slot mapping, ``prefill`` attends packed
variable-length queries to their cached context (any mix of prefill chunks and decodes, a decode
being a query of length 1), ``decode`` attends one query per sequence (steps where every sequence
decodes, the case CUDA graphs replay). Each also takes the layer's ``k_scale`` / ``v_scale``, read
only when the cache is fp8.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import reference, torch_paged
from nanovllm.layers.kv_quant import calibrate_kv_scales
from nanovllm.utils.context import get_context


class TorchBackend:
    """Plain torch: the CPU path (kernels/torch_paged.py; kernels/reference.py is the oracle of both)."""

    name = "torch"
    qkv_prep = None  # no fused norm + rotary + store: the model's layers do it

    @staticmethod
    def v_key_major(cache_dtype: torch.dtype) -> bool:
        """Whether the V cache is laid out key-major (kernels/reference.py): not here (its gathers
        read whole rows)."""
        return False

    @staticmethod
    def store(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        ctx = get_context()
        if ctx.slot_mapping is not slot_mapping:  # called outside a step's forward
            reference.store_kvcache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
            return
        plan = torch_paged.step_plan(ctx, k_cache.shape[1], k_cache.shape[2])
        torch_paged.store_kvcache(key, value, k_cache, v_cache, plan, k_scale, v_scale)

    @staticmethod
    def prefill(q, k_cache, v_cache, ctx, scale, k_scale=None, v_scale=None):
        plan = torch_paged.step_plan(ctx, k_cache.shape[1], k_cache.shape[2])
        return torch_paged.paged_attention(q, k_cache, v_cache, plan, scale, k_scale, v_scale)

    decode = prefill  # one plan covers decode-only steps, prompt chunks and any mix of the two


def get_backend(name: str, device: str, block_size: int = 256, fp8_cache: bool = False):
    """Resolve ``attention_backend`` ("auto", "torch", "triton", "flash-attn") to a backend."""
    if name == "auto":
        if device == "cpu":
            name = "torch"
        else:
            try:
                import flash_attn  # noqa: F401

                name = "flash-attn" if block_size % 256 == 0 and not fp8_cache else "triton"
            except ImportError:
                name = "triton"
    if name == "torch":
        return TorchBackend
    if device == "cpu":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; use 'torch' on the CPU")
    if name == "triton":
        from nanovllm.layers.attention_triton import TritonBackend

        return TritonBackend
    if name == "flash-attn":
        if block_size % 256:
            raise ValueError(
                f"flash-attn's paged kernels need kvcache_block_size % 256 == 0, got {block_size}"
            )
        from nanovllm.layers.attention_flash import FlashAttnBackend

        return FlashAttnBackend
    raise ValueError(f"unknown attention backend {name!r}")


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = (
            num_heads,
            head_dim,
            scale,
            num_kv_heads,
        )
        self.backend = TorchBackend
        # Set by the model runner once the KV cache exists: [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # fp8 caches: x / scale is stored (1.0 unless calibrated; see layers/kv_quant.py). Updated
        # in place only, so captured CUDA graphs read the current values.
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.calibrate_kv_scales = False  # set by the model runner; cleared by the first prefill

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ctx = get_context()
        if self.k_cache is None:  # warm-up forward before the cache exists
            return self._no_cache_prefill(q, k, v, ctx)
        if self.calibrate_kv_scales and not ctx.is_decode_only:
            calibrate_kv_scales(k, v, self.k_scale, self.v_scale)
            self.calibrate_kv_scales = False
        self.backend.store(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.k_scale, self.v_scale)
        return self._attend(q, ctx)

    def fuses_qkv_prep(self) -> bool:
        """Whether ``forward_qkv`` can run: a backend with the fused kernel, a cache, and no fp8 scale
        calibration due in this step (it needs k and v apart; decode-only steps never calibrate, so
        CUDA graphs captured before the first prefill take the fused path as eager decodes do)."""
        if self.backend.qkv_prep is None or self.k_cache is None:
            return False
        return not (self.calibrate_kv_scales and not get_context().is_decode_only)

    def forward_qkv(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], from qkv_proj
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        q_norm: nn.Module | None = None,  # RMSNorm over each q / k head (Qwen3), or None
        k_norm: nn.Module | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """``forward`` from the fused projection: norms, rotary and the cache store in one kernel."""
        ctx = get_context()
        weights = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else (None, None, 0.0)
        q = self.backend.qkv_prep(
            qkv, positions, cos_sin_cache, self.num_heads, self.num_kv_heads, self.k_cache, self.v_cache,
            ctx.slot_mapping, *weights, self.k_scale, self.v_scale,
        )  # fmt: skip
        return self._attend(q, ctx)

    def _attend(self, q: torch.Tensor, ctx) -> torch.Tensor:
        scales = self.k_scale, self.v_scale
        if ctx.is_decode_only:
            return self.backend.decode(q, self.k_cache, self.v_cache, ctx, self.scale, *scales)
        return self.backend.prefill(q, self.k_cache, self.v_cache, ctx, self.scale, *scales)

    def _no_cache_prefill(self, q, k, v, ctx) -> torch.Tensor:
        out = torch.empty_like(q)
        cu = ctx.cu_seqlens_q.tolist()
        group = self.num_heads // self.num_kv_heads
        for start, end in zip(cu[:-1], cu[1:], strict=False):
            # [1, heads, len, head_dim]: 4-D inputs let SDPA pick a fused kernel that never
            # materialises the [len, len] score matrix (this forward also sizes the KV cache).
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1).unsqueeze(0),
                k[start:end].transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0),
                v[start:end].transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0),
                is_causal=True,
                scale=self.scale,
            )
            out[start:end] = o[0].transpose(0, 1)
        return out
