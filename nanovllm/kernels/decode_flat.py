"""Decode attention with the work cut evenly over the programs ("flat", stream-K style), in Triton.

An experiment beside the split kernel (decode_attention.py), not yet run on a GPU: the engine takes
it only with ``NANOVLLM_DECODE=flat`` (layers/attention_triton.py), and ``scripts/gpu_fp8_check.sh``
times both, at one layer (``flat``) and on the reference workload (``flatab``).

The split kernel gives each program one (row, KV head, split); at batches of 64 and more a row is one
program, and a program with an fp8 cache reads half the bytes of a bf16 one in half as many 128-key
tiles. Its fixed costs (the chain of dependent loads before its first tile, filling the pipeline,
draining it) then weigh twice as much: H200, one layer, lengths uniform in 100..2048, fp8 reads at
0.86 / 0.76 / 0.56 of copy bandwidth at batch 256 / 128 / 64 where bf16 reads at 1.0 / 0.94 / 0.65,
and more splits made fp8 slower (session 30, bench_kernels.py --balance-sweep).

Here each KV head's work is one list of tiles, the rows' tiles one after another, cut into ranges of
equal length, one per program (``flat_plan.plan_flat_decode``, on the host, from the context
lengths and block tables)::

    tiles of one KV head:  | row 0 ......... | row 1 ... | row 2 ................. | row 3 |
    programs:              |--- p0 ---|--- p1 ---|--- p2 ---|--- p3 ---|--- p4 ---|- p5 -|

    grid = (num_kv_heads, programs)

* A program walks its range in one pipelined loop: the loads of the tiles ahead (each tile's
  record, with its row and cache block, then K and V) are in flight while it computes, across row
  boundaries too, so a row costs its bytes and not a round trip.
* Every program does the same number of tiles (one more at most), so all finish together, provided
  they all run at once: ``programs`` must not exceed what fits on the SMs, or the ones past it wait
  for a whole range to end (a second wave). sm_90 SASS compiled on a CPU, fp8 with key-major V,
  128-key tiles: 168 registers, and 45 KB of shared memory at 4 stages (one K/V tile in flight) or
  82 KB at 5 and 6 (two, and the queries' buffers): 3 programs fit an SM at 4 stages, 2 at 5, the
  launcher's default and so the engine's default of 2 an SM (``flat_plan.device_programs``).
* The queries go to fp16 unscaled (bf16 -> fp16 is exact in fp16's range; saturated past it) and
  the scale multiplies the fp32 scores: folding it into q first, as the split kernel does, took 16
  more registers a thread (184 at 4 stages: 2 programs an SM, not 3).
* A tile's row is looked up each iteration (``tiles``), and so are its queries (a few hundred bytes,
  from L2 after the row's first tile). At a row's first tile in the range the running max
  restarts at -inf, and the online-softmax step then scales the old sum and output by exp2(-inf) = 0.
* A row whose tiles lie inside one range ("whole") writes its output at its last tile. A row cut by
  a range's end leaves a partial output and log-sum-exp per piece; the last piece to arrive (an
  atomic counter per row and KV head, as the split kernel's) merges them, in range order. A
  program holds at most two pieces: its first row's (slot 0, ``program * 2``) and its last row's
  (slot 1), so the scratch is ``[2 * programs, num_heads, head_dim]`` whatever the batch.
* The plan is a function of the context lengths and block tables, so the host computes it from
  values it already has (InputBatch packs it after the block tables) and the kernel never waits
  for the GPU. A CUDA graph fixes the grid: ``programs`` comes from the device and heads only, and
  a plan with fewer tiles than ``min_tiles`` a program leaves the last ranges empty.
* Rows with no keys have no tiles and are not written (the split kernel writes zeros; the engine's
  decode rows always hold the new token's key, and a CUDA graph's padding rows are ignored).
* Tiles lie inside one cache block (``block_n`` divides the block size), as the split kernel's
  ONE_LOOP path: an fp8 cache with key-major V reads every tile whole and masks the scores; the
  stale V slots meet weights of exactly 0 (an fp8 cache is never NaN, reference.py). Other caches
  mask the loads.
"""

import logging
import math

import torch
import triton
import triton.language as tl

from nanovllm.kernels import pdl
from nanovllm.kernels.decode_attention import (
    MAX_COUNTERS,
    _counters_for,
    _v_offsets,
    check_kv_caches,
    online_softmax_step,
)
from nanovllm.kernels.flat_plan import FlatPlan

logger = logging.getLogger("nanovllm")
_checked: set[int] = set()  # the compiled variants whose fit on the GPU was checked


@triton.jit(do_not_specialize=["tiles_ptr", "bounds_ptr", "pieces_ptr", "stride_tiles", "stride_pieces"])
def _decode_flat_kernel(
    q_ptr,  # [batch, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    tiles_ptr,  # FlatPlan.tiles (its rows stride_tiles apart)
    bounds_ptr,  # FlatPlan.bounds
    pieces_ptr,  # FlatPlan.pieces
    out_ptr,  # [batch, num_heads, head_dim]
    partial_ptr,  # [2 * programs, num_heads, head_dim] fp32
    lse_ptr,  # [2 * programs, num_heads] fp32
    counters_ptr,  # [>= batch * num_kv_heads] int32, all 0 between launches
    k_scale_ptr,  # [1] fp32 (fp8 caches only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    stride_qb,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_tiles,
    stride_pieces,
    stride_ob,
    stride_oh,
    num_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # >= 16, power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    V_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides BLOCK_SIZE
    DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    FP16_DOT: tl.constexpr,  # fp8 cache, bf16 queries: both go to fp16 (decode_attention.py)
    V_KEY_MAJOR: tl.constexpr,
    MERGE_G: tl.constexpr,
    MERGE_CHUNK: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_previous(PDL)
    kv_head = tl.program_id(0)
    program = tl.program_id(1)
    lo = tl.load(bounds_ptr + program)
    hi = tl.load(bounds_ptr + program + 1)
    if lo < hi:
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        row_mask = rows < GROUP
        heads = kv_head * GROUP + rows
        qk = qk_scale
        v_scale = 1.0
        if FP8:
            qk = qk * tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        piece_lo = lo  # the tile the current piece started at
        from_key_0 = lo < 0  # False: whether the current piece started at its row's first key
        for t in tl.range(lo, hi, num_stages=STAGES):
            seq = tl.load(tiles_ptr + t)
            key = tl.load(tiles_ptr + stride_tiles + t)
            context_len = tl.load(tiles_ptr + 2 * stride_tiles + t)
            q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                        mask=row_mask[:, None], other=0.0)  # fmt: skip
            if FP16_DOT:  # bf16 -> fp16 exactly in fp16's range, saturated past it (never inf)
                q = tl.clamp(q, -65504.0, 65504.0).to(tl.float16)
            block_id = tl.load(tiles_ptr + 3 * stride_tiles + t).to(tl.int64)
            keys = tl.arange(0, BLOCK_N)
            key_mask = key + keys < context_len
            slot = tl.multiple_of(key % BLOCK_SIZE, BLOCK_N) + keys
            k_ptrs = (
                k_cache_ptr
                + (block_id * stride_cb + slot * stride_cs + kv_head * stride_ch)[:, None]
                + dims[None, :]
            )
            v_off = (
                _v_offsets(block_id, slot, stride_vb, stride_vs, BLOCK_SIZE, V_BLOCK) + kv_head * stride_vh
            )
            v_ptrs = v_cache_ptr + v_off[:, None] + dims[None, :] * stride_vd
            if FP8 and V_KEY_MAJOR:  # read whole (a mask would split the 16-key vectors): see above
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=key_mask[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=key_mask[:, None], other=0.0)
            k, v = k.to(q.dtype), v.to(q.dtype)
            first = (t == lo) | (key == 0)
            m_i = tl.where(first, float("-inf"), m_i)  # the sum and output follow: scaled by exp2(-inf)
            piece_lo = tl.where(first, t, piece_lo)
            from_key_0 = tl.where(first, key == 0, from_key_0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [GROUP_PAD, BLOCK_N]
            s = s * qk
            s = tl.where(key_mask[None, :], s, float("-inf"))
            # Every tile holds a key of its row, so a restarted max becomes finite here.
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION)
            row_ends = key + BLOCK_N >= context_len
            if row_ends | (t == hi - 1):  # the piece ends: write it
                out = acc / l_i[:, None]
                if FP8:
                    out = out * v_scale
                if from_key_0 & row_ends:  # the whole row: its output
                    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])  # fmt: skip
                else:
                    piece = 2 * program + (piece_lo != lo).to(tl.int32)
                    at = piece * num_heads + heads
                    tl.store(
                        partial_ptr + at[:, None] * HEAD_DIM + dims[None, :], out, mask=row_mask[:, None]
                    )
                    tl.store(lse_ptr + at, m_i + tl.log2(l_i), mask=row_mask)  # base 2

        # The rows cut by this range's ends: the last of their pieces to arrive merges them. The
        # barrier puts every thread's stores before the counter's release (as the split kernel's).
        tl.debug_barrier()
        first_seq = tl.load(tiles_ptr + lo)
        last_seq = tl.load(tiles_ptr + hi - 1)
        _arrive(first_seq, kv_head, pieces_ptr, stride_pieces, counters_ptr, partial_ptr, lse_ptr, out_ptr,
                num_heads, stride_ob, stride_oh, GROUP, HEAD_DIM, MERGE_G, MERGE_CHUNK)  # fmt: skip
        if last_seq != first_seq:
            _arrive(last_seq, kv_head, pieces_ptr, stride_pieces, counters_ptr, partial_ptr, lse_ptr, out_ptr,
                    num_heads, stride_ob, stride_oh, GROUP, HEAD_DIM, MERGE_G, MERGE_CHUNK)  # fmt: skip


@triton.jit
def _arrive(seq, kv_head, pieces_ptr, stride_pieces, counters_ptr, partial_ptr, lse_ptr, out_ptr, num_heads,
            stride_ob, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr,
            CHUNK: tl.constexpr):  # fmt: skip
    """Count one piece of ``seq`` (KV head ``kv_head``) in, if the row is cut into pieces; the last to
    arrive merges them into ``out`` and leaves the counter at 0 for the next launch."""
    count = tl.load(pieces_ptr + stride_pieces + seq)
    if count > 1:
        counter = counters_ptr + seq * tl.num_programs(0) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == count - 1:
            first_piece = tl.load(pieces_ptr + seq)
            _merge_pieces(partial_ptr, lse_ptr, out_ptr, seq, kv_head, first_piece, count, num_heads,
                          stride_ob, stride_oh, GROUP, HEAD_DIM, G, CHUNK)  # fmt: skip
            tl.store(counter, 0)


@triton.jit
def _merge_pieces(partial_ptr, lse_ptr, out_ptr, seq, kv_head, first_piece, count, num_heads, stride_ob,
                  stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr,
                  CHUNK: tl.constexpr):  # fmt: skip
    """The ``count`` pieces of one row and KV head, each weighted by ``exp(lse_piece - lse_total)``,
    in range order, CHUNK at a time with a running max. Piece 0 lies at ``first_piece``; piece k > 0
    is the first piece (slot 0) of the k-th program after it. Loads bypass L1 (.cg): other programs
    wrote them."""
    g = tl.arange(0, G)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g
    dims = tl.arange(0, HEAD_DIM)
    first_program = first_piece // 2
    top = tl.full([G], float("-inf"), dtype=tl.float32)
    total = tl.zeros([G], dtype=tl.float32)
    acc = tl.zeros([G, HEAD_DIM], dtype=tl.float32)
    for c in range(0, count, CHUNK):
        k = c + tl.arange(0, CHUNK)
        piece = tl.where(k == 0, first_piece, 2 * (first_program + k))
        ok = g_ok[:, None] & (k < count)[None, :]  # [G, CHUNK]
        at = piece[None, :] * num_heads + heads[:, None]
        lse = tl.load(lse_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        new_top = tl.maximum(top, tl.max(lse, axis=1))
        new_top = tl.where(new_top == float("-inf"), 0.0, new_top)  # padding heads: nothing seen
        rescale = tl.exp2(top - new_top)
        weight = tl.exp2(lse - new_top[:, None])
        part = tl.load(partial_ptr + at[:, :, None] * HEAD_DIM + dims[None, None, :], mask=ok[:, :, None],
                       other=0.0, cache_modifier=".cg")  # fmt: skip
        acc = acc * rescale[:, None] + tl.sum(part * weight[:, :, None], axis=1)
        total = total * rescale + tl.sum(weight, axis=1)
        top = new_top
    out = acc / tl.maximum(total, 1e-30)[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])  # fmt: skip


def flat_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per row
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: FlatPlan,  # on q's device (FlatPlan.to), from the rows' context lengths and block tables
    scale: float,
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,  # [batch, num_heads, head_dim] to write into (a view is fine)
    launch: dict | None = None,  # num_warps / num_stages in place of 4 / 5 for fp8, 3 otherwise
) -> torch.Tensor:
    """The split kernel's function (``paged_decode_attention``) under a flat plan; rows without keys
    are left unwritten."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim and q.stride(2) == 1
    assert head_dim in (16, 32, 64, 128, 256), "head_dim must be a power of two"
    check_kv_caches(k_cache, v_cache)
    assert isinstance(plan.tiles, torch.Tensor) and plan.tiles.device == q.device, (
        "plan: FlatPlan.to(q.device)"
    )
    assert plan.block_size == block_size, (
        f"the plan is for {plan.block_size}-slot blocks, the cache has {block_size}"
    )
    assert plan.block_n >= 16, f"tiles of 16 keys or more (tl.dot), the plan's have {plan.block_n}"
    assert plan.pieces.shape == (2, batch), f"the plan is for {plan.pieces.shape[1]} rows, q has {batch}"
    assert batch * num_kv_heads <= MAX_COUNTERS, f"flat decode: {MAX_COUNTERS} row-heads at most"
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (k_scale is not None and v_scale is not None), "an fp8 KV cache needs its scales"
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1
    group = num_heads // num_kv_heads
    programs = plan.programs
    partial = torch.empty(2 * programs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(2 * programs, num_heads, dtype=torch.float32, device=q.device)
    launch = {"num_warps": 4, "num_stages": 5 if fp8 else 3} | (launch or {})
    stages = launch.pop("num_stages")
    merge_g = triton.next_power_of_2(group)
    kernel = _decode_flat_kernel[(num_kv_heads, programs)](
        q, k_cache, v_cache, plan.tiles, plan.bounds, plan.pieces, out, partial, lse,
        _counters_for(q.device),
        k_scale if fp8 else q, v_scale if fp8 else q,  # unread unless fp8
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *v_cache.stride(),
        plan.tiles.stride(0),
        plan.pieces.stride(0),
        out.stride(0), out.stride(1),
        num_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        V_BLOCK=v_cache.shape[1],
        BLOCK_N=plan.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=fp8,
        FP16_DOT=fp8 and q.dtype == torch.bfloat16,
        V_KEY_MAJOR=v_cache.stride(1) == 1,
        MERGE_G=merge_g,
        MERGE_CHUNK=max(1, 4096 // (merge_g * head_dim)),
        STAGES=stages,
        **launch,
        **pdl.launch_options(q),
    )  # fmt: skip
    if q.is_cuda and id(kernel) not in _checked:  # once a compiled variant
        _checked.add(id(kernel))
        fits = fits_per_sm(kernel, q.device, launch["num_warps"])
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        if num_kv_heads * programs > fits * sms:
            logger.warning(
                "flat decode: %d programs, but %d fit on this GPU at once (%d an SM at %d registers and "
                "%d bytes of shared memory): the rest run as a second wave; lower PER_SM in NANOVLLM_DECODE",
                num_kv_heads * programs, fits * sms, fits, kernel.n_regs, kernel.metadata.shared,
            )  # fmt: skip
    return out


def fits_per_sm(kernel, device: torch.device, num_warps: int) -> int:
    """How many programs of a compiled kernel one SM holds at once, by registers and shared memory
    (1 KB of it reserved a program)."""
    props = torch.cuda.get_device_properties(device)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    return min(
        regs // (kernel.n_regs * 32 * num_warps),
        props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024),
    )
