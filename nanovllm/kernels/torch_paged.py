"""Paged attention in a handful of torch ops per layer: the torch backend's path (the CPU default).

Same semantics as ``reference.py`` (same cache layout, bottom-right causal prefill, fp8 caches read as
``x * scale``, attention in float32), built for speed where every torch op costs microseconds:

* Everything that depends only on the step (which cache rows each sequence reads, the padding and
  causal masks, which new tokens are decodes) is computed once per step in a ``StepPlan`` and shared
  by every layer; a layer then runs two ``index_select`` gathers, two batched matmuls and a softmax.
* The gathers read rows of the cache viewed as ``[num_slots * num_kv_heads, head_dim]`` in the order
  ``(sequence, kv head, position)``, so K and V come out contiguous in the layout batched matmuls
  want, with no transpose copy; only each sequence's own tokens are read, never whole blocks.
* Runs of decodes (one new token each) form one batch, padded to the run's longest context with an
  additive ``-inf`` bias; a prompt chunk (several new tokens) goes through
  ``scaled_dot_product_attention`` with its causal mask, which never holds the full score matrix for
  a causal chunk without a cached prefix. A step may mix both in any order.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanovllm.kernels.reference import FP8_DTYPE, quantize_fp8_ref


@dataclass
class DecodeRun:
    """Consecutive sequences that each decode one token: new tokens ``[start, end)``."""

    start: int
    end: int
    rows: torch.Tensor  # [n * num_kv_heads * max_len] rows of the cache viewed as [-1, head_dim]
    bias: torch.Tensor  # [n * num_kv_heads, 1, max_len] float32: 0, or -inf past a sequence's context
    max_len: int


@dataclass
class PrefillSeq:
    """One sequence with ``end - start > 1`` new tokens, attending to ``context_len`` keys."""

    start: int
    end: int
    rows: torch.Tensor  # [num_kv_heads * context_len]
    mask: torch.Tensor | None  # [q_len, context_len] bool (True: may attend); None: plain causal
    context_len: int


class StepPlan:
    """Index tensors of one step, shared by every layer (they depend on the step, not the layer)."""

    def __init__(self, ctx, block_size: int, num_kv_heads: int):
        self.key = _key(ctx, block_size, num_kv_heads)
        device = ctx.slot_mapping.device
        slots = ctx.slot_mapping.long()
        keep = slots >= 0
        self.all_stored = bool(keep.all())
        self.store_slots = slots if self.all_stored else slots[keep]
        self.store_rows = None if self.all_stored else keep.nonzero().squeeze(1)
        heads = torch.arange(num_kv_heads, device=device)
        tables = ctx.block_tables.long()
        cu, lens = ctx.cu_seqlens_q.tolist(), ctx.context_lens.tolist()
        self.parts: list[DecodeRun | PrefillSeq] = []
        b = 0
        while b < len(lens):
            if cu[b + 1] - cu[b] == 1:  # a run of decodes
                e = b
                while e < len(lens) and cu[e + 1] - cu[e] == 1:
                    e += 1
                run_lens = torch.tensor(lens[b:e], device=device)
                max_len = max(lens[b:e])
                pos = torch.arange(max_len, device=device)
                valid = pos[None, :] < run_lens[:, None]  # [n, max_len]
                run_slots = _slots(tables[b:e], pos, block_size, valid)
                bias = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))
                rows = (run_slots[:, None, :] * num_kv_heads + heads[None, :, None]).flatten()
                bias = bias.repeat_interleave(num_kv_heads, 0).unsqueeze(1)
                self.parts.append(DecodeRun(cu[b], cu[e], rows, bias, max_len))
                b = e
            else:
                ctx_len, q_len = lens[b], cu[b + 1] - cu[b]
                pos = torch.arange(ctx_len, device=device)
                seq_slots = _slots(tables[b : b + 1], pos, block_size, None)[0]
                rows = (seq_slots[None, :] * num_kv_heads + heads[:, None]).flatten()
                mask = None
                if q_len != ctx_len:  # a cached prefix: query i sees keys up to ctx_len - q_len + i
                    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
                    mask = pos[None, :] <= q_pos[:, None]
                self.parts.append(PrefillSeq(cu[b], cu[b + 1], rows, mask, ctx_len))
                b += 1


def _slots(
    tables: torch.Tensor, pos: torch.Tensor, block_size: int, valid: torch.Tensor | None
) -> torch.Tensor:
    """Cache slot of each (sequence, position); positions past a context read slot 0 (masked out)."""
    blocks = tables[:, pos // block_size]
    if valid is not None:  # padding entries of a block table may hold anything
        blocks = blocks.masked_fill(~valid, 0)
    return blocks * block_size + pos % block_size


def _key(ctx, block_size: int, num_kv_heads: int) -> tuple:
    tensors = (ctx.slot_mapping, ctx.block_tables, ctx.cu_seqlens_q, ctx.context_lens)
    return (id(ctx), block_size, num_kv_heads, *map(id, tensors))


_PLAN: list = [None, None]  # [the Context it was built for (kept alive so its id stays unique), plan]


def step_plan(ctx, block_size: int, num_kv_heads: int) -> StepPlan:
    """The plan of ``ctx``'s step, built by the first layer that asks and reused by the others.

    A plan is recognised by the identity of the Context and of its tensors: a step's metadata must be
    a new Context (or new tensors), never the last step's tensors changed in place (inference-mode
    tensors keep no version counter that would tell)."""
    ctx_ref, plan = _PLAN
    if ctx_ref is not ctx or plan.key != _key(ctx, block_size, num_kv_heads):
        plan = StepPlan(ctx, block_size, num_kv_heads)
        _PLAN[:] = [ctx, plan]
    return plan


def store_kvcache(key, value, k_cache, v_cache, plan: StepPlan, k_scale=None, v_scale=None) -> None:
    """Write the step's new K/V ([num_tokens, num_kv_heads, head_dim]) to their slots."""
    for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if not plan.all_stored:
            x = x.index_select(0, plan.store_rows)
        rows = cache.view(-1, *cache.shape[2:])
        if cache.dtype == FP8_DTYPE:  # index_copy_ has no fp8 kernel: copy the bytes
            x, rows = quantize_fp8_ref(x, scale).view(torch.uint8), rows.view(torch.uint8)
        rows.index_copy_(0, plan.store_slots, x.to(rows.dtype))


def _gather(cache: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache rows as float32 ``[len(rows), head_dim]`` (fp8 rows times their scale)."""
    x = cache.view(-1, cache.shape[-1]).index_select(0, rows)
    return x.float() * scale if cache.dtype == FP8_DTYPE else x.float()


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], any mix of decodes and prompt chunks
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: StepPlan,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    single = len(plan.parts) == 1
    out = None if single else torch.empty_like(q)
    for part in plan.parts:
        qs = q[part.start : part.end].float()
        if isinstance(part, DecodeRun):
            n = part.end - part.start
            k = _gather(k_cache, part.rows, k_scale).view(n * num_kv_heads, part.max_len, head_dim)
            v = _gather(v_cache, part.rows, v_scale).view(n * num_kv_heads, part.max_len, head_dim)
            # [n * num_kv_heads, group, max_len]: query heads of one KV head side by side
            scores = torch.baddbmm(
                part.bias, qs.reshape(n * num_kv_heads, group, head_dim), k.transpose(1, 2), alpha=scale
            )
            o = torch.bmm(scores.softmax(dim=-1), v).view(n, num_heads, head_dim)
        else:
            k = _gather(k_cache, part.rows, k_scale).view(1, num_kv_heads, part.context_len, head_dim)
            v = _gather(v_cache, part.rows, v_scale).view(1, num_kv_heads, part.context_len, head_dim)
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1).unsqueeze(0),  # [1, num_heads, q_len, head_dim]
                k,
                v,
                attn_mask=part.mask,
                is_causal=part.mask is None,
                scale=scale,
                enable_gqa=True,
            )[0].transpose(0, 1)
        if single:
            return o.to(q.dtype)
        out[part.start : part.end] = o
    return out
