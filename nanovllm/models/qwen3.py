"""Qwen3: the Llama decoder with an RMSNorm over each query and key head before rotary."""

from nanovllm.layers.layernorm import RMSNorm
from nanovllm.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, prefix: str = ""):
        super().__init__(config, prefix)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
