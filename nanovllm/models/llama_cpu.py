"""The lean CPU forward of a Llama-family model whose linear weights stay packed (GGUF, the CPU default).

The same layers and weights as ``LlamaModel.forward``, called without the modules' ``forward`` methods
and with fewer dtype round trips (about 160 aten calls a decoder layer, nested ones counted, instead of
200): on a CPU each op costs microseconds of dispatch. Measured at batch 1 on a 2-core EPYC, forward and
logits (benchmarks/profile_cpu_step.py --compare-lean): 42 -> 29 ms a step, with the float16 lm_head below.

Dtypes (the packed int4 kernel takes and returns bfloat16)::

    residual stream  float32   embedding -> (+ attention out) -> (+ MLP out) -> final norm, float32
    norm outputs     bfloat16  rms_norm computed in float32, rounded once: the matmul's input
    q/k after rotary float32   one float copy of q and k together, rotated in place
    attention        float32   kernels/torch_paged.py, cache in its own dtype
    MLP activation   bfloat16  silu(gate) * up on the kernel's bfloat16 output

The tied embedding / lm_head matrix (49152 x 576 for SmolLM2, GGUF Q8_0) is held in float16 once this
path first runs: half the bytes of float32, and a float16 matmul reads it twice as fast at one or two
logit rows; at more rows, where CPUs lack a fast float16 matmul, slices of it are widened to float32
just before their matmul. Rounding Q8_0's ``d * q`` to float16 changes a weight by at most 2^-12 of it.

Not used (the modules' own forward runs instead) before the KV cache exists, for fp8 caches, for
models with per-head q/k norms (Qwen3), or when any projection is a plain float weight.
"""

import torch
import torch.nn.functional as F

from nanovllm.kernels import torch_paged
from nanovllm.layers.linear import LinearBase
from nanovllm.utils.context import get_context

BF16 = torch.bfloat16


def lean_cpu_eligible(model) -> bool:
    """True when every decoder layer of ``model`` (a LlamaModel) can run the lean CPU forward."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if attn.q_norm is not None or any(lin.packed is None for lin in linears):
            return False
    return True


def _linear(lin: LinearBase, x: torch.Tensor) -> torch.Tensor:
    """bfloat16 [n, in] -> [n, out] (bfloat16; float32 where a bias is added)."""
    y = lin.packed.mm(x)
    return y if lin.bias is None else y + lin.bias


def _rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 [n, d] -> bfloat16 ``x * rsqrt(mean(x^2) + eps) * weight``, computed in float32."""
    r = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return torch.mul(x, r).mul_(weight).to(BF16)


def _cos_sin(rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 1, head_dim] ``[cos, cos]`` and ``[-sin, sin]``: rotate-half as one multiply-add."""
    cos, sin = rotary.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


HALF_LOGITS_MAX_ROWS = 4  # float16 matmul up to this many logit rows; float32 slices above
_SLICE_ROWS = 4096  # vocabulary rows widened to float32 at a time (9 MB: stays in the L3 cache)


def _to_half(param: torch.nn.Parameter) -> None:
    if param.dtype != torch.float16:
        param.data = param.data.half()


def lean_logits(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [m, vocab] of float32 ``hidden`` [m, d] against the float16 ``weight`` [vocab, d]."""
    if hidden.shape[0] <= HALF_LOGITS_MAX_ROWS:
        return F.linear(hidden.half(), weight).float()
    out = torch.empty(hidden.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], _SLICE_ROWS):
        rows = weight[start : start + _SLICE_ROWS]
        torch.mm(hidden, rows.float().t(), out=out[:, start : start + rows.shape[0]])
    return out


def lean_forward(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """Hidden states [n, hidden] float32 after the final norm, or None where this path does not apply
    (the caller then runs the modules' forward)."""
    first = model.layers[0].self_attn.attn
    if first.k_cache is None or first.k_cache.dtype not in (torch.float32, BF16, torch.float16):
        return None
    if first.calibrate_kv_scales:
        return None
    _to_half(model.embed_tokens.weight)
    ctx = get_context()
    k_cache = first.k_cache
    plan = torch_paged.step_plan(ctx, k_cache.shape[1], k_cache.shape[2])
    n = input_ids.shape[0]
    cos, sin = _cos_sin(model.layers[0].self_attn.rotary_emb, positions)
    hidden = F.embedding(input_ids, model.embed_tokens.weight).float()
    residual = None
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        residual = hidden if residual is None else residual + hidden
        norm = layer.input_layernorm
        qkv = _linear(attn.qkv_proj, _rms_norm_bf16(residual, norm.weight, norm.eps))
        qk_size = (heads + kv_heads) * head_dim
        qk = qkv[:, :qk_size].view(n, heads + kv_heads, head_dim).float()  # a fresh float32 copy
        swapped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
        qk.mul_(cos).add_(swapped.mul_(sin))  # x * [cos, cos] + [x2, x1] * [-sin, sin]
        v = qkv[:, qk_size:].view(n, kv_heads, head_dim)
        layer_attn = attn.attn
        k_cache, v_cache = layer_attn.k_cache, layer_attn.v_cache
        torch_paged.store_kvcache(qk[:, heads:], v, k_cache, v_cache, plan)
        o = torch_paged.paged_attention(qk[:, :heads], k_cache, v_cache, plan, layer_attn.scale)
        hidden = _linear(attn.o_proj, o.view(n, heads * head_dim).to(BF16))
        residual = residual + hidden
        norm = layer.post_attention_layernorm
        gate_up = _linear(mlp.gate_up_proj, _rms_norm_bf16(residual, norm.weight, norm.eps))
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = _linear(mlp.down_proj, F.silu(gate).mul_(up).to(BF16))
    residual = residual + hidden
    return F.rms_norm(residual, model.norm.weight.shape, model.norm.weight, model.norm.eps)
