"""Llama family (Llama 2/3/3.1, SmolLM, ...): the decoder skeleton the Qwen models reuse.

embed_tokens -> N x [ RMSNorm -> attention (+res) -> RMSNorm -> SwiGLU MLP (+res) ] -> RMSNorm -> lm_head
"""

import torch
from torch import nn

from nanovllm.distributed import tp_size
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import get_rope
from nanovllm.models.llama_cpu import dense_embedding, lean_cpu_eligible, lean_forward, lean_logits
from nanovllm.utils.context import get_context


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def packed_type(config, prefix: str) -> str | None:
    """The GGUF block format the weight of module ``prefix`` stays packed in, or None (a float weight)."""
    return (getattr(config, "packed_modules", None) or {}).get(prefix)


def rope_of(config) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 or 5 config."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = (
        params if params.get("rope_type", "default") != "default" else getattr(config, "rope_scaling", None)
    )
    return theta, scaling


class LlamaAttention(nn.Module):
    qkv_bias = False

    def __init__(self, config, prefix: str = ""):
        super().__init__()
        tp = tp_size()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=bias,
            quant_type=packed_type(config, f"{prefix}.qkv_proj"),
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=getattr(config, "attention_bias", False),
            quant_type=packed_type(config, f"{prefix}.o_proj"),
        )
        theta, scaling = rope_of(config)
        self.rotary_emb = get_rope(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        self.q_norm: nn.Module | None = None  # Qwen3 normalises each q and k head
        self.k_norm: nn.Module | None = None

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden_states))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the qkv projection's output on, through o_proj."""
        if self.attn.fuses_qkv_prep():  # CUDA: the steps below in one kernel
            cos_sin = self.rotary_emb.cos_sin_cache
            o = self.attn.forward_qkv(qkv, positions, cos_sin, self.q_norm, self.k_norm)
        else:
            q, k, v = self.split_qkv(qkv)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
            o = self.attn(q, k, v)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.flatten(1, 2))


class LlamaMLP(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], quant_type=packed_type(config, f"{prefix}.gate_up_proj")
        )
        self.down_proj = RowParallelLinear(
            inter, config.hidden_size, quant_type=packed_type(config, f"{prefix}.down_proj")
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up through down_proj."""
        if self.down_proj.takes_gemv(gate_up):  # a few rows on CUDA: silu * up inside the GEMV
            return self.down_proj(gate_up, act="silu_mul")
        return self.down_proj(self.act_fn(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, attention_cls: type[nn.Module], prefix: str):
        super().__init__()
        self.self_attn = attention_cls(config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each norm goes with the projection after it: on the decode GEMV path the two are one kernel.
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = attn.qkv_proj.norm_forward(norm1, hidden_states, residual)
        hidden_states = attn.attend(positions, qkv)
        gate_up, residual = mlp.gate_up_proj.norm_forward(norm2, hidden_states, residual)
        return mlp.down(gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, config, attention_cls: type[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [
                LlamaDecoderLayer(config, attention_cls, f"model.layers.{i}")
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lean_cpu: bool | None = None  # decided at the first CPU forward, once weights are packed

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not input_ids.is_cuda:
            if self.lean_cpu is None:
                self.lean_cpu = lean_cpu_eligible(self)
            if self.lean_cpu and (hidden_states := lean_forward(self, input_ids, positions)) is not None:
                return hidden_states
            dense_embedding(self)  # where the loader kept only the GGUF blocks
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    attention_cls: type[nn.Module] = LlamaAttention
    # checkpoint name -> (our parameter name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.model = LlamaModel(config, self.attention_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        weight = self.lm_head.weight
        if self.model.lean_cpu and weight is self.model.embed_tokens.weight:  # tied, packed by lean_forward
            indices = get_context().logits_indices
            return lean_logits(self.model, hidden_states if indices is None else hidden_states[indices])
        return self.lm_head(hidden_states)
