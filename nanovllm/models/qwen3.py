"""Qwen3: the Llama decoder with an RMSNorm over each query and key head before rotary."""

import torch

from nanovllm.layers.layernorm import RMSNorm
from nanovllm.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, prefix: str = ""):
        super().__init__(config, prefix)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv_proj(hidden_states))
        q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        return self.o_proj(self.attn(q, k, v).flatten(1, 2))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
