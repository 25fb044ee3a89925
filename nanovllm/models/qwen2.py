"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k and v projections."""

from nanovllm.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    qkv_bias = True


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen2Attention
