"""Plain-torch attention over the paged KV cache: the CPU backend and the oracle for the GPU kernels.

Paged KV cache layout (one tensor per layer for K, one for V)::

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    block_table of one sequence:  [ 7, 2, 9 ]          (physical block ids, in logical order)
    token at position p lives in: block_table[p // block_size], row p % block_size
    its "slot" is:                block_id * block_size + p % block_size

New K/V are written through ``slot_mapping`` (one slot per new token, -1 = do not write) and read
back through block tables. Padding entries of a block table (past a sequence's last block) may hold
any value; they are never read.

Prefill attention is causal and bottom-right aligned: a sequence with ``context_len`` keys of which
the last ``q_len`` are new queries lets query ``i`` (0-based among the new ones) see keys
``0 .. context_len - q_len + i``. Prefix-cache hits (and chunked prefill) are this same case.

The shape above is each cache's logical one; its memory may be laid out otherwise, and everything
here indexes through it, never a ``view``. The Triton backend lays an fp8 V cache out key-major in
blocks of 64 slots (``key_major``): ``[num_blocks * block_size / 64, num_kv_heads, head_dim, 64]``
memory seen through a permuted view as a cache of 64-slot blocks, so that the keys of one dim, the
reduction axis of ``p @ v``, are contiguous and go to the tensor cores untransposed
(kernels/decode_attention.py), while a token's 128 bytes of a head land 64 bytes apart, in 8 KB, not
256 apart over a whole 256-slot block. Slot ``s`` of V is row ``s % 64`` of V block ``s // 64``, and
K block ``b`` holds V blocks ``b * block_size / 64`` onwards: the V cache may have smaller blocks than
K (``in_blocks_of`` reads it with K's). H200, Qwen3-0.6B shapes, one layer, by V block (16, 32, 64,
128, 256 slots): one decode step's qkv_prep at batch 256 9.7, 11.4, 16.0, 23.6, 26.9 us; decode
attention over lengths 100..2048 151-152 us from 64 slots up, 157.4 at 32 and 192.5 at 16, whose
16-byte pieces of a dim fill half a sector each (benchmarks/results.jsonl, "v_sub_block_sweep").

An fp8 cache (``torch.float8_e4m3fn``) holds ``x / scale`` (computed ``x * (1 / scale)``, see
``quantize_fp8_ref``) saturated to +-448, with one float32 scale per layer for K and one for V
(1-element tensors, so a CUDA graph reads their current value). It never holds NaN: the
quantisers store NaN as 0 and the engine allocates the cache zeroed.
Reads dequantise (``x * scale``) and attention runs in float32. Caches of the model dtype ignore
the scales (they may be ``None``).
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn; it has no inf, and casting past it gives NaN


def quantize_fp8_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 / scale)`` rounded to the nearest float8_e4m3fn, saturated to +-448, NaN as 0:
    never NaN out, so stale cache slots are finite (the decode kernel relies on it). A multiply by
    the reciprocal, as vLLM's quantiser: it may differ from ``x / scale`` by one float32 ulp before
    the cast, and the kernels then need one division a program."""
    return (x.float().nan_to_num(nan=0.0) * (1.0 / scale.float())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_ref(cache_rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached rows as float32: ``x * scale`` for an fp8 cache, a plain upcast otherwise."""
    if cache_rows.dtype == FP8_DTYPE:
        assert scale is not None, "an fp8 KV cache needs its k_scale / v_scale"
        return cache_rows.float() * scale
    return cache_rows.float()


def _to_cache(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if cache.dtype == FP8_DTYPE:
        assert scale is not None, "an fp8 KV cache needs its k_scale / v_scale"
        return quantize_fp8_ref(x, scale)
    return x.to(cache.dtype)


V_SUB_BLOCK = 64  # slots per block of the engine's key-major V cache (read when a cache is made)


def key_major(cache: torch.Tensor, sub_block: int | None = None) -> torch.Tensor:
    """The memory of a contiguous [num_blocks, block_size, num_kv_heads, head_dim] cache read as
    [num_blocks * block_size / sub, num_kv_heads, head_dim, sub], seen as a cache of ``sub``-slot
    blocks: a key-major V cache. ``sub``: ``sub_block`` (default ``V_SUB_BLOCK``), at most
    ``block_size``. Its contents are not carried over (allocate, then write; ``to_key_major``
    copies)."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    sub = min(sub_block or V_SUB_BLOCK, block_size)
    assert block_size % sub == 0, f"key-major V blocks of {sub} slots must divide the block size {block_size}"
    return cache.view(num_blocks * block_size // sub, num_kv_heads, head_dim, sub).permute(0, 3, 1, 2)


def to_key_major(cache: torch.Tensor, sub_block: int | None = None) -> torch.Tensor:
    """A key-major copy of a [num_blocks, block_size, num_kv_heads, head_dim] cache."""
    out = key_major(torch.empty_like(cache, memory_format=torch.contiguous_format), sub_block)
    return out.copy_(cache.reshape(out.shape))


def in_blocks_of(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """A cache of smaller blocks (a key-major V) seen in blocks of ``block_size`` slots, as K's: the
    cache itself if its blocks are that size already, else a copy to read."""
    if cache.shape[1] == block_size:
        return cache
    return cache.reshape(-1, block_size, *cache.shape[2:])


def store_kvcache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = skip
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size, v_block_size = k_cache.shape[1], v_cache.shape[1]  # V's may be smaller (key_major)
    k_cache[slots // block_size, slots % block_size] = _to_cache(key[keep], k_cache, k_scale)
    v_cache[slots // v_block_size, slots % v_block_size] = _to_cache(value[keep], v_cache, v_scale)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` cached rows of one sequence: [num_tokens, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (num_tokens + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:num_tokens]


def paged_decode_attention_ref(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [batch, max_blocks] int
    context_lens: torch.Tensor,  # [batch] int, keys per sequence (including the new token)
    scale: float,
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [batch, num_heads, head_dim]
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(context_lens.max())
    # Block and row of every (sequence, position < max_len): gathers tokens, not whole blocks.
    pos = torch.arange(max_len, device=q.device)
    blocks = block_tables[:, pos // block_size].long().clamp(min=0)  # [batch, max_len]
    rows = pos % block_size
    # [batch, max_len, num_kv_heads, head_dim]
    k = dequantize_ref(k_cache[blocks, rows], k_scale)
    v = dequantize_ref(in_blocks_of(v_cache, block_size)[blocks, rows], v_scale)
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    pad = torch.arange(max_len, device=q.device)[None, :] >= context_lens[:, None].to(q.device)
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", scores.softmax(dim=-1), v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [num_new_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int, offsets of each sequence's queries in q
    context_lens: torch.Tensor,  # [batch] int, keys per sequence (cached prefix + new tokens)
    block_tables: torch.Tensor,  # [batch, max_blocks] int
    scale: float,
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_new_tokens, num_heads, head_dim]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    v_cache = in_blocks_of(v_cache, k_cache.shape[1])
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        k = dequantize_ref(gather_kv(k_cache, block_tables[b], ctx), k_scale)  # [ctx, num_kv_heads, head_dim]
        v = dequantize_ref(gather_kv(v_cache, block_tables[b], ctx), v_scale)
        qg = q[start:end].float().view(q_len, num_kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qg, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", scores.softmax(dim=-1), v)
        out[start:end] = o.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


def qkv_prep_ref(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim] float32, [cos | sin]
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # q: [num_tokens, num_heads, head_dim]; K and V written to the cache
    """Split q, k, v; RMSNorm q and k per head (if weights are given); rotate-half rotary on q and k;
    store k and v. The rounding of the model's unfused layers: norm in float32, rounded, times the
    weight, rounded; rotary in float32, rounded."""
    head_dim = k_cache.shape[3]
    q, k, v = qkv.view(qkv.shape[0], -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], dim=1)

    def norm(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def rotate(x):
        cos, sin = cos_sin_cache[positions.long()].unsqueeze(1).chunk(2, dim=-1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    if q_norm_weight is not None:
        q, k = norm(q, q_norm_weight), norm(k, k_norm_weight)
    q, k = rotate(q), rotate(k)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q.contiguous()
