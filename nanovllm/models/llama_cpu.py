"""The lean CPU forward of a Llama-family model whose linear weights stay packed (GGUF, the CPU default).

The same layers and weights as ``LlamaModel.forward``, called without the modules' ``forward`` methods
and with few dtype round trips: on a CPU each op costs microseconds of dispatch.

With the C kernels (kernels/cpu/, the default on AVX2 CPUs) everything is float32 between the quantised
matmuls (a float16 KV cache, the default with packed GGUF weights, is widened as it is read), and the
tied embedding / lm_head matrix (49152 x 576 for SmolLM2, GGUF Q8_0) stays in the file's blocks (the
loader's ``lean_embed``: 29 MB instead of 113, nothing decoded at start-up) and serves both the
embedding lookup and the logits. A float embedding (quantization=None, safetensors) is quantised to
Q8_0 at the first lean step instead.

Without them (torch's int4 kernel, which takes and returns bfloat16)::

    residual stream  float32   embedding -> (+ attention out) -> (+ MLP out) -> final norm, float32
    norm outputs     bfloat16  rms_norm computed in float32, rounded once: the matmul's input
    q/k after rotary float32   one float copy of q and k together, rotated in place
    attention        float32   kernels/torch_paged.py, cache in its own dtype
    MLP activation   bfloat16  silu(gate) * up on the kernel's bfloat16 output

and the tied matrix is held in float16: half the bytes of float32, read twice as fast by a float16
matmul at one or two logit rows; at more rows, where CPUs lack a fast float16 matmul, slices of it are
widened to float32 just before their matmul. Rounding Q8_0's ``d * q`` to float16 changes a weight by
at most 2^-12 of it.

Not used (the modules' own forward runs instead) before the KV cache exists, for fp8 caches, for
models with per-head q/k norms (Qwen3), or when any projection is a plain float weight.
"""

import torch
import torch.nn.functional as F

from nanovllm.kernels import torch_paged
from nanovllm.kernels.cpu import decode_step, ops
from nanovllm.layers.linear import LinearBase
from nanovllm.layers.quantization import PackedWeight, act_dtype, dequantize, quantize_q8_0
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
    """``act_dtype()`` [n, in] -> [n, out] (the same dtype; float32 where a bias is added)."""
    y = lin.packed.mm(x)
    return y if lin.bias is None else y + lin.bias


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """float32 [n, d] -> ``x * rsqrt(mean(x^2) + eps) * weight`` in ``dtype``, computed in float32."""
    r = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return torch.mul(x, r).mul_(weight).to(dtype)


def _cos_sin(rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 1, head_dim] ``[cos, cos]`` and ``[-sin, sin]``: rotate-half as one multiply-add."""
    cos, sin = rotary.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


HALF_LOGITS_MAX_ROWS = 4  # float16 matmul up to this many logit rows; float32 slices above
_SLICE_ROWS = 4096  # vocabulary rows widened to float32 at a time (9 MB: stays in the L3 cache)


def _to_half(param: torch.nn.Parameter) -> None:
    if param.dtype != torch.float16:
        param.data = param.data.half()


def _pack_embedding(model) -> None:
    """Once: the embedding as Q8_0 blocks in ``model.lean_embed`` (C kernels) or in float16 (else).
    A GGUF embedding the loader kept in its blocks is already there."""
    weight = model.embed_tokens.weight
    if getattr(model, "lean_embed", None) is not None or weight.dtype == torch.float16:
        return
    if ops.available() and weight.shape[1] % 32 == 0:
        model.lean_embed = PackedWeight(quantize_q8_0(weight.data), "Q8_0")
        weight.data = torch.empty(0)  # the tied lm_head reads lean_embed too (lean_logits)
    else:
        _to_half(weight)


def dense_embedding(model) -> None:
    """The float embedding matrix for the modules' forward (not the lean one: an fp8 KV cache, a model
    it does not take) where the loader kept only the file's blocks in ``model.lean_embed``: decoded as
    the dequantising loader decodes them, so this path computes what it computes with quantization=None."""
    weight, packed = model.embed_tokens.weight, getattr(model, "lean_embed", None)
    if weight.numel() == 0 and packed is not None:
        weight.data = dequantize(packed.raw, packed.qtype).to(weight.dtype)


def lean_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [m, vocab] of float32 ``hidden`` [m, d] against the tied embedding of ``model``
    (a LlamaModel) in whatever form ``lean_forward`` left it."""
    if getattr(model, "lean_embed", None) is not None:
        return model.lean_embed.mm(hidden.float())
    weight = model.embed_tokens.weight
    if weight.dtype != torch.float16:
        return F.linear(hidden, weight)
    return half_logits(weight, hidden)


def half_logits(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
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
    _pack_embedding(model)
    act = act_dtype()
    ctx = get_context()
    k_cache = first.k_cache
    plan = torch_paged.step_plan(ctx, k_cache.shape[1], k_cache.shape[2])
    c_ready = model.norm.weight.dtype == torch.float32  # the C kernels take float32 weights and rows
    if getattr(model, "lean_embed", None) is not None and k_cache.dtype in ops.KV_TYPE_IDS and c_ready:
        return _forward_c(model, input_ids, positions, ctx, plan)
    n = input_ids.shape[0]
    cos, sin = _cos_sin(model.layers[0].self_attn.rotary_emb, positions)
    if getattr(model, "lean_embed", None) is not None:
        hidden = model.lean_embed.rows(input_ids)
    else:
        hidden = F.embedding(input_ids, model.embed_tokens.weight).float()
    residual = None
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        residual = hidden if residual is None else residual + hidden
        norm = layer.input_layernorm
        qkv = _linear(attn.qkv_proj, _rms_norm(residual, norm.weight, norm.eps, act))
        qk_size = (heads + kv_heads) * head_dim
        qk = qkv[:, :qk_size].view(n, heads + kv_heads, head_dim).float()  # rotated in place
        swapped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
        qk.mul_(cos).add_(swapped.mul_(sin))  # x * [cos, cos] + [x2, x1] * [-sin, sin]
        v = qkv[:, qk_size:].view(n, kv_heads, head_dim)
        layer_attn = attn.attn
        k_cache, v_cache = layer_attn.k_cache, layer_attn.v_cache
        torch_paged.store_kvcache(qk[:, heads:], v, k_cache, v_cache, plan)
        o = torch_paged.paged_attention(qk[:, :heads], k_cache, v_cache, plan, layer_attn.scale)
        hidden = _linear(attn.o_proj, o.view(n, heads * head_dim).to(act))
        residual = residual + hidden
        norm = layer.post_attention_layernorm
        gate_up = _linear(mlp.gate_up_proj, _rms_norm(residual, norm.weight, norm.eps, act))
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = _linear(mlp.down_proj, F.silu(gate).mul_(up).to(act))
    residual = residual + hidden
    return F.rms_norm(residual, model.norm.weight.shape, model.norm.weight, model.norm.eps)


def _forward_c(model, input_ids: torch.Tensor, positions: torch.Tensor, ctx, plan) -> torch.Tensor:
    """``lean_forward`` on the C kernels (kernels/cpu/), float32 throughout (a float16 cache is rounded to
    nearest even on store and widened on read): per layer two fused residual
    add + RMSNorm calls, rotary in place on q and k inside the qkv output, decode attention straight
    from the paged cache (prompt chunks: torch_paged), SiLU * up in one call."""
    n = input_ids.shape[0]
    decode = ctx.is_decode_only and ctx.block_tables is not None and ctx.block_tables.shape[0] == n
    cos_sin = model.layers[0].self_attn.rotary_emb.cos_sin_cache
    positions = positions.to(torch.int64).contiguous()
    residual, hidden = model.lean_embed.rows(input_ids), None
    if decode and (step := _decode_step(model)) is not None:
        tables, lens = ctx.block_tables, ctx.context_lens
        return step(residual, cos_sin, positions, ctx.slot_mapping, tables, lens, model.norm.weight)
    for layer in model.layers:
        attn, mlp, layer_attn = layer.self_attn, layer.mlp, layer.self_attn.attn
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        norm = layer.input_layernorm
        qkv = _linear(attn.qkv_proj, ops.add_rms_norm(residual, hidden, norm.weight, norm.eps))
        ops.rope_(qkv, heads + kv_heads, head_dim, cos_sin, positions)
        k_cache, v_cache = layer_attn.k_cache, layer_attn.v_cache
        k = qkv[:, q_size : q_size + kv_size].view(n, kv_heads, head_dim)
        v = qkv[:, q_size + kv_size :].view(n, kv_heads, head_dim)
        torch_paged.store_kvcache(k, v, k_cache, v_cache, plan)
        if decode:
            tables, lens = ctx.block_tables, ctx.context_lens
            o = ops.decode_attention(qkv, k_cache, v_cache, tables, lens, heads, layer_attn.scale)
        else:
            q = qkv[:, :q_size].view(n, heads, head_dim)
            o = torch_paged.paged_attention(q, k_cache, v_cache, plan, layer_attn.scale).reshape(n, q_size)
        hidden = _linear(attn.o_proj, o)
        norm = layer.post_attention_layernorm
        gate_up = _linear(mlp.gate_up_proj, ops.add_rms_norm(residual, hidden, norm.weight, norm.eps))
        hidden = _linear(mlp.down_proj, ops.silu_mul(gate_up))
    return ops.add_rms_norm(residual, hidden, model.norm.weight, model.norm.eps)


def _projections(layer) -> tuple[LinearBase, ...]:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def _decode_step(model) -> decode_step.DecodeStep | None:
    """The model's one-call decode step (kernels/cpu/decode_step.py), built once per KV cache; None
    where the layers do not suit it (a bias, differing norm eps or head shapes) or ``model.fused_decode``
    is False."""
    if not getattr(model, "fused_decode", True):
        return None
    first = model.layers[0].self_attn
    key = (first.attn.k_cache.data_ptr(), first.attn.v_cache.data_ptr())
    cached = getattr(model, "_decode_step_cache", None)
    if cached is None or cached[0] != key:
        model._decode_step_cache = (key, _build_decode_step(model))
    return model._decode_step_cache[1]


def _build_decode_step(model) -> decode_step.DecodeStep | None:
    first = model.layers[0].self_attn
    dims = (first.num_heads, first.num_kv_heads, first.head_dim)
    eps = {model.norm.eps}
    for layer in model.layers:
        a = layer.self_attn
        eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
        if (a.num_heads, a.num_kv_heads, a.head_dim) != dims or len(eps) > 1:
            return None
        if any(lin.bias is not None or lin.packed.qmatmul is None for lin in _projections(layer)):
            return None
    inter = model.layers[0].mlp.down_proj.packed.shape[1]
    if not decode_step.supported(model.norm.weight.numel(), *dims, inter):
        return None
    layers = []
    for layer in model.layers:
        packed = [lin.packed.qmatmul for lin in _projections(layer)]
        norms = (layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data)
        kv = (layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache)
        layers.append(decode_step.LayerTensors(*packed, *norms, *kv))
    return decode_step.DecodeStep(layers, *dims, model.norm.eps, first.attn.scale)
