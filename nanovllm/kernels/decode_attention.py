"""Decode attention over the paged KV cache: split-K ("flash-decoding"), in Triton.

A decode step has one query token per sequence, so the work is reading each sequence's K and V once;
the kernel is bound by memory bandwidth and the design follows from keeping every SM busy reading::

    grid = (num_kv_heads, batch, num_splits)

    sequence b, kv head h:   keys 0 ............................................. context_len
                             |-- split 0 --|-- split 1 --|-- split 2 --|-- split 3 --|
                             each split walks its keys in tiles of BLOCK_N, looking up
                             every key's block in the block table (a tile may span blocks,
                             unless BLOCK_N divides the block size: then one lookup a tile)

* One program serves all the query heads of one KV head (the GQA group), so each K/V tile is read
  from memory once. The group is padded to 16 rows so ``tl.dot`` can use the tensor cores.
* Splitting the context fills the GPU when ``batch * num_kv_heads`` alone is too few programs
  (batch 1 has 8). Each split keeps a running max and sum (online softmax) and writes its normalised
  partial output and log-sum-exp. The splits of a (sequence, KV head) count their arrivals on an
  atomic counter, and the last to arrive merges them all, weighting each by
  ``exp(lse_split - lse_total)``, in split order (deterministic): no second kernel, which took
  ~2.4 us of each ~25 us layer at batch 1 (H200 trace). A sequence with one split writes its output
  directly. Batch-1 decode went from 0.838 to 0.790 ms a step with this and a GEMV block size
  (~0.02 ms of it; bench_decode_variants.py, H200).
* Rows longest context first (``order``, from the host: ``Context.decode_order``). A program is
  one (row, KV head, split), and the GPU starts programs in grid order as earlier ones finish; in
  row order a long sequence that starts near the end runs on alone while the SMs around it idle.
  The grid is (KV heads, rows, splits) so that one row's heads start together, and the host passes
  the rows sorted with their lengths (two independent loads, so the order adds no step to the
  kernel's chain of dependent loads). H200, one layer, context lengths uniform in 100..2048
  (bench_kernels.py --balance-sweep): bf16 batch 256 275.8 -> 255.2 us, batch 128 160.6 -> 143.1;
  fp8 batch 256 212.7 -> 194.0, batch 128 127.1 -> 108.9, batch 32 55.4 -> 46.2. More splits did
  not help at these batches. Small batches (< 9 rows) keep row order.
* ``num_splits`` is a function of shapes only (batch, heads and ``max_context_len``), never of the
  values in ``context_lens``, so the call never waits for the GPU and can be captured in a CUDA
  graph. Inside the kernel each sequence divides its own context evenly over the splits in whole
  tiles; the splits past a short context exit at once.
* An fp8 cache (float8_e4m3fn, see ``reference.py``) halves the bytes read. Each tile is upcast to
  fp16 (exact: every e4m3 value is an fp16 value) and multiplied on the tensor cores with fp32
  accumulation; bf16 queries are converted to fp16 too, with the softmax scale and ``k_scale``
  folded in first (so |q| stays far below fp16's 65504), because e4m3 -> fp16 is one instruction
  per pair where e4m3 -> bf16 is several. ``v_scale`` is applied to the output.
* The engine's fp8 V cache is key-major (``reference.key_major``): a tile of V is the B operand of
  ``p @ v`` with the keys as its reduction axis, and key-major it goes to the tensor cores as it
  lies, converted in registers like K. Slot-major it must be transposed on the way (see
  ``FP8_V_STAGED``): converting, staging it through shared memory as fp16 and reading it back
  transposed cost the loop a third of its instructions and held the kernel at 55-67% of copy
  bandwidth. H200, one layer, 128-key tiles, sm_90 SASS of the loop 841 -> 673 instructions;
  batch 256 x 1k keys 212.3 -> 159.4 us (bf16 259.0), lengths 100..2048 longest first 209.8 ->
  169.3 (bf16 268.4), batch 64 x 4k 251.5 -> 182.4 (bf16 264.4): 58-63% -> 71-78% of copy
  bandwidth, with 5 stages (two tiles in flight) where slot-major wanted 3
  (bench_kernels.py --fp8-sweep). Its loads run along the keys, so a mask on them would split
  the 16-key vectors into bytes: every tile reads its block whole, its scores past the end
  masked (below).
* Whole tiles are attended without masks, the last partial tile of a split with them
  (``_attend_tile``'s MASKED); the mask costs the loop ~10% of its instructions (412 -> 372 for
  bf16's 64-key tiles). That last tile runs in a loop of its own, unpipelined: its loads wait
  alone. The engine's fp8 cache (key-major V, tiles inside one block) runs every tile masked in
  the one pipelined loop instead (ONE_LOOP): K and V are read whole, the scores past ``end`` set to
  -inf, and V's stale slots are not zeroed, because an fp8 cache never holds NaN (the quantiser maps
  NaN to 0 and saturates, and the cache starts zeroed), so they meet weights of exactly 0. The
  score mask adds 32 instructions to a loop of ~690 (sm_90 SASS); zeroing V there as well cost 128
  selects and a third more shared memory (2 programs an SM, not 3) and was slower than two loops.
  H200, lengths 100..2048 longest first, shipped splits: batch 256 166.1 -> 154.9 us, 128 97.2 ->
  90.6, 64 58.1 -> 56.0, 8 25.1 -> 20.9; reference workload 32,075 -> 32,863 tok/s (medians of
  three, same call; bf16 cache 25,618).
* WARP_SPLIT (``launch={"warp_split": 4}``, ONE_LOOP only; off by default, not yet timed on a GPU):
  the four warps of a program share each tile's scores, so every tile takes the row max across
  warps through shared memory and hands p back through it for ``p @ v``: 9 barriers per 128-key
  tile in the sm_90 SASS. Split, each warp takes 32 consecutive keys of the tile (a batch axis of
  both dots) with its own running max, sum and output, merged once after the loop: 2 barriers,
  679 instructions a tile instead of 721, but 168 registers instead of 124 (each warp holds a whole
  [16, 128] output, and rescales it: 64 FMULs a tile) and 82 KB of shared memory at 5 stages
  instead of 74 (the queries broadcast to the four warps), so 2 programs an SM, not 3; at 4 stages
  (one tile buffer, 49 KB) the registers allow 3. ``scripts/gpu_fp8_check.sh warps`` times both
  beside the shipped launch (benchmarks/bench_decode_launch.py, spec suffix ``:ws``).
"""

import math

import torch
import triton
import triton.language as tl

try:
    from nanovllm.kernels import pdl
except ModuleNotFoundError:  # loaded by path beside another package named nanovllm (the anchors' shim)
    import importlib.util
    import os

    _path = os.path.join(os.path.dirname(__file__), "pdl.py")
    _spec = importlib.util.spec_from_file_location("_nanovllm_pdl", _path)
    pdl = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(pdl)
wait_for_previous = pdl.wait_for_previous

NUM_SMS = 132  # H100 SXM; a little more or less only shifts the split heuristic.
MAX_SPLITS = 64

# A slot-major fp8 V cache (a caller's own; the engine's is key-major, see above): its tile goes to
# the tensor cores as fp16, with the keys along the dot's reduction axis, while each key's row is
# contiguous in the cache, so the tile must be transposed on the way. Left alone,
# Triton transposes the 1-byte values (one shared-memory load per byte: 128 LDS.U8 per thread per
# 128-key tile, 203 registers, 2 programs per SM) and converts after. A multiply by a run-time 1.0
# after the conversion keeps the conversion first: the tile is converted in registers and
# transposed as fp16 through shared memory with ldmatrix.trans (sm_90 SASS of the loop: 1,179 ->
# 922 instructions per 128 keys, 158 registers; H200, batch 256 x 1k keys: 220.6 -> 196.0 us).
# A switch, so benchmarks can time both.
FP8_V_STAGED = True


# The split count is a runtime value (one compiled kernel whatever it is; mixed steps pick it from
# each step's batch), except whether there is more than one: ONE_SPLIT writes the output directly.
# Nor are the int32 metadata pointers specialised on 16-byte alignment: a mixed step passes views
# that start at its first decode or prefill row, and each alignment was a variant of its own, first
# built inside a run (benchmarks/triton_builds.py: 3 decode and 1 prefill variant, ~0.6-1.1 s each
# with a cold cache on an H200). Their loads are scalar, so the hint bought nothing. Likewise the
# order's row stride: a mixed step's order is [2, D] for any D, the graphs' one row of a wider buffer.
@triton.jit(
    do_not_specialize=["num_splits", "block_tables_ptr", "context_lens_ptr", "order_ptr", "stride_order"]
)
def _decode_split_kernel(
    q_ptr,  # [batch, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [batch, max_blocks]
    context_lens_ptr,  # [batch]
    order_ptr,  # [2, batch] int32: the rows longest context first, and their lengths (ORDERED)
    out_ptr,  # [batch, num_heads, head_dim]
    partial_ptr,  # [batch, num_heads, num_splits, head_dim] fp32 (not ONE_SPLIT)
    lse_ptr,  # [batch, num_heads, num_splits] fp32 (not ONE_SPLIT)
    counters_ptr,  # [>= batch * num_kv_heads] int32, all 0 between launches (not ONE_SPLIT)
    k_scale_ptr,  # [1] fp32 (fp8 caches only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    v_unit,  # 1.0 (FP8_V_STAGED)
    stride_qb,
    stride_qh,
    stride_cb,  # the K cache's strides (its head_dim stride is 1)
    stride_cs,
    stride_ch,
    stride_vb,  # the V cache's: slot-major like K, or key-major (stride_vs 1)
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_order,
    stride_ob,
    stride_oh,
    num_heads,
    num_splits,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16, power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    V_BLOCK: tl.constexpr,  # tokens per V cache block: BLOCK_SIZE, or fewer key-major (reference.key_major)
    BLOCK_N: tl.constexpr,  # keys per tile
    ONE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,  # the cache is float8_e4m3fn, dequantised with k_scale / v_scale
    FP16_DOT: tl.constexpr,  # fp8 cache, bf16 queries: both go to fp16, not bf16 (see above)
    V_STAGED: tl.constexpr,  # FP8_V_STAGED
    MERGE_G: tl.constexpr,  # GROUP rounded up to a power of two
    MERGE_CHUNK: tl.constexpr,  # splits the merge reads at a time
    SPLITS_PAD: tl.constexpr,  # MAX_SPLITS
    ORDERED: tl.constexpr,  # take the rows in order_ptr's order
    V_KEY_MAJOR: tl.constexpr,  # the V cache's slots are its contiguous axis (stride_vs == 1)
    PDL: tl.constexpr,  # launched early (kernels/pdl.py)
    ONE_LOOP: tl.constexpr,  # every tile in the masked loop, pipelined (fp8 key-major V; see above)
    MASKED_STAGES: tl.constexpr,  # the masked loop's num_stages: 1, or the launch's with ONE_LOOP
    WARP_SPLIT: tl.constexpr,  # > 1: each tile in this many sub-tiles with a softmax each (ONE_LOOP)
):
    wait_for_previous(PDL)  # q and this step's K/V come from the kernel just before
    kv_head = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    if ORDERED:  # both loads at once: the length does not wait for the row
        seq = tl.load(order_ptr + row)
        context_len = tl.load(order_ptr + stride_order + row)
    else:
        seq = row
        context_len = tl.load(context_lens_ptr + seq)

    # Each sequence divides its context over the splits in whole tiles; `used` of them hold keys.
    keys_per_split = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    used = tl.cdiv(context_len, tl.maximum(keys_per_split, 1))
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, context_len)
    if split < tl.maximum(used, 1):  # split 0 always runs: it writes zeros for an empty sequence
        rows = tl.arange(0, GROUP_PAD)  # query heads of this group (padding rows masked)
        dims = tl.arange(0, HEAD_DIM)
        row_mask = rows < GROUP
        heads = kv_head * GROUP + rows
        q_offs = seq * stride_qb + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_mask[:, None], other=0.0)
        q, qk_scale = scale_queries(q, qk_scale, k_scale_ptr, FP8, FP16_DOT)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        kv_head_off = kv_head * stride_ch
        v_head_off = kv_head * stride_vh
        if WARP_SPLIT > 1:
            m_i, l_i, acc = _attend_warps(
                q, qk_scale, k_cache_ptr, v_cache_ptr, table, start, end, kv_head_off, v_head_off, stride_cb,
                stride_cs, stride_vb, stride_vs, stride_vd, HEAD_DIM, BLOCK_SIZE, V_BLOCK, BLOCK_N, GROUP_PAD,
                WARP_SPLIT, MASKED_STAGES, DOT_PRECISION, FP16_DOT,
            )  # fmt: skip
        else:
            # Whole tiles first, unmasked; then the last, partial tile with its keys masked, in a loop
            # of its own, unpipelined (MASKED_STAGES 1: no buffers). When a tile may span blocks, every
            # tile is masked, so the table's padding is never read. ONE_LOOP: every tile masked,
            # pipelined, and stale V slots trusted to be finite (see above).
            if ONE_LOOP or BLOCK_SIZE % BLOCK_N != 0:
                full_end = start
            else:
                full_end = start + (end - start) // BLOCK_N * BLOCK_N
            for tile_start in range(start, full_end, BLOCK_N):
                m_i, l_i, acc = _attend_tile(
                    m_i, l_i, acc, q, qk_scale, v_unit, k_cache_ptr, v_cache_ptr, table, tile_start, end,
                    kv_head_off, v_head_off, stride_cb, stride_cs, stride_vb, stride_vs, stride_vd, HEAD_DIM,
                    BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, FP8, FP16_DOT, V_STAGED, V_KEY_MAJOR, V_BLOCK,
                    True,
                )  # fmt: skip
            for tile_start in tl.range(full_end, end, BLOCK_N, num_stages=MASKED_STAGES):
                m_i, l_i, acc = _attend_tile(
                    m_i, l_i, acc, q, qk_scale, v_unit, k_cache_ptr, v_cache_ptr, table, tile_start, end,
                    kv_head_off, v_head_off, stride_cb, stride_cs, stride_vb, stride_vs, stride_vd, HEAD_DIM,
                    BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, FP8, FP16_DOT, V_STAGED, V_KEY_MAJOR, V_BLOCK,
                    not ONE_LOOP,
                )  # fmt: skip

        # l_i >= 1 once a split has seen a key (its max contributes exp2(0)); an empty sequence has
        # l_i = 0 and writes zeros.
        l_i = tl.maximum(l_i, 1.0)
        out = acc / l_i[:, None]
        if FP8:
            out = out * tl.load(v_scale_ptr)
        out_offs = seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        if ONE_SPLIT:
            tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
        elif used <= 1:  # the only split with keys: nothing to merge
            tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
        else:
            part = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD] rows of lse / partial
            tl.store(partial_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_mask[:, None])
            tl.store(lse_ptr + part, m_i + tl.log2(l_i), mask=row_mask)  # base 2
            # The last split of this (sequence, KV head) to arrive merges them all. The barrier puts
            # every thread's stores before the counter's release; the last one's acquire makes the
            # other splits' stores visible to it. It leaves the counter at 0 for the next launch.
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(0) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == used - 1:
                _merge_group(partial_ptr, lse_ptr, out_ptr, seq, kv_head, used, num_heads, num_splits,
                             stride_ob, stride_oh, GROUP, HEAD_DIM, MERGE_G, MERGE_CHUNK,
                             SPLITS_PAD)  # fmt: skip
                tl.store(counter, 0)


@triton.jit
def _attend_warps(q, qk_scale, k_cache_ptr, v_cache_ptr, table, start, end, kv_head_off, v_head_off,
                  stride_cb, stride_cs, stride_vb, stride_vs, stride_vd, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, V_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_PAD: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, FP16_DOT: tl.constexpr):  # fmt: skip
    """The keys ``start .. end`` as ONE_LOOP reads them, but each tile cut into W sub-tiles of
    consecutive keys, a batch axis of both dots: with W warps Triton gives each warp one sub-tile,
    and each keeps its own running max, sum and output, so the loop exchanges nothing between warps
    (see WARP_SPLIT above). Returns the W states merged: max, sum and unnormalised output."""
    SUB: tl.constexpr = BLOCK_N // W
    dims = tl.arange(0, HEAD_DIM)
    sub = tl.arange(0, W)[:, None] * SUB + tl.arange(0, SUB)[None, :]  # [W, SUB] key offsets in a tile
    q3 = tl.broadcast_to(q[None, :, :], (W, GROUP_PAD, HEAD_DIM))
    m_i = tl.full([W, GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([W, GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([W, GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for tile_start in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        k_off, v_off = _block_tile_offsets(
            table, tile_start, sub, kv_head_off, v_head_off, stride_cb, stride_cs, stride_vb, stride_vs,
            BLOCK_SIZE, BLOCK_N, V_BLOCK,
        )  # fmt: skip
        k = tl.load(k_cache_ptr + k_off[:, :, None] + dims[None, None, :]).to(q.dtype)
        v = tl.load(v_cache_ptr + v_off[:, :, None] + dims[None, None, :] * stride_vd).to(q.dtype)
        s = tl.dot(q3, tl.trans(k, 0, 2, 1), input_precision=DOT_PRECISION)  # [W, GROUP_PAD, SUB]
        if not FP16_DOT:
            s = s * qk_scale
        s = tl.where((tile_start + sub < end)[:, None, :], s, float("-inf"))
        # A warp whose keys all lie past ``end`` has seen none yet: its rows are empty.
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION, 2, MAY_BE_EMPTY=True)
    m = tl.max(m_i, axis=0)
    weight = tl.exp2(m_i - tl.where(m == float("-inf"), 0.0, m)[None, :])  # [W, GROUP_PAD]
    return m, tl.sum(l_i * weight, axis=0), tl.sum(acc * weight[:, :, None], axis=0)


@triton.jit
def scale_queries(q, qk_scale, k_scale_ptr, FP8: tl.constexpr, FP16_DOT: tl.constexpr):
    """The queries and the scale left for the scores: an fp8 cache's ``k_scale`` joins the softmax
    scale, and with FP16_DOT the scale is folded into q before it goes to fp16 (keeping |q| far from
    fp16's range limit), leaving 1.0. Shared with the prefill kernel."""
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if FP16_DOT:
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        qk_scale = 1.0
    return q, qk_scale


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, table, start, end, kv_head_off, v_head_off, stride_cb, stride_cs,
                 stride_vb, stride_vs, stride_vd, dtype: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FP8: tl.constexpr,
                 V_KEY_MAJOR: tl.constexpr, V_BLOCK: tl.constexpr,
                 ZERO_STALE_V: tl.constexpr = True):  # fmt: skip
    """K and V of the keys ``start .. start + BLOCK_N`` of one sequence and KV head, [BLOCK_N,
    HEAD_DIM] each (fp8 caches converted to ``dtype``), and the mask of the keys below ``end``.
    MASKED: the keys from ``end`` on are for the caller to mask; they read as zeros, except in a
    tile inside one block of a key-major V cache: read whole there, V's zeroed if ZERO_STALE_V
    (else the whole tile is below ``end``). Only table entries of blocks that hold keys are read:
    its padding is never touched. Shared with the prefill kernel."""
    dims = tl.arange(0, HEAD_DIM)
    pos = start + tl.arange(0, BLOCK_N)
    key_mask = pos < end
    if BLOCK_SIZE % BLOCK_N == 0:  # tiles start at multiples of BLOCK_N: one block per tile
        k_off, v_off = _block_tile_offsets(
            table, start, tl.arange(0, BLOCK_N), kv_head_off, v_head_off, stride_cb, stride_cs, stride_vb,
            stride_vs, BLOCK_SIZE, BLOCK_N, V_BLOCK,
        )  # fmt: skip
    else:
        if MASKED:
            block_ids = tl.load(table + pos // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
        else:
            block_ids = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
        k_off = block_ids * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head_off
        v_off = _v_offsets(block_ids, pos % BLOCK_SIZE, stride_vb, stride_vs, BLOCK_SIZE, V_BLOCK)
        v_off += v_head_off
    k_ptrs = k_cache_ptr + k_off[:, None] + dims[None, :]
    v_ptrs = v_cache_ptr + v_off[:, None] + dims[None, :] * stride_vd
    # Key-major V: a mask along the keys would split its 16-key vector loads into bytes. The tile
    # lies in one block this sequence holds, so it is read whole, K too (the caller masks the
    # scores), and V's slots past ``end`` zeroed (ZERO_STALE_V) unless the caller knows them finite.
    V_WHOLE: tl.constexpr = MASKED and V_KEY_MAJOR and BLOCK_SIZE % BLOCK_N == 0
    if MASKED and not V_WHOLE:
        k = tl.load(k_ptrs, mask=key_mask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if MASKED and not V_WHOLE:
        v = tl.load(v_ptrs, mask=key_mask[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if FP8:
        k, v = k.to(dtype), v.to(dtype)
    if V_WHOLE and ZERO_STALE_V:  # a stale slot may hold anything, NaN included, and 0 * NaN is NaN
        v = tl.where(key_mask[:, None], v, 0.0)
    return k, v, key_mask


@triton.jit
def _block_tile_offsets(table, start, keys, kv_head_off, v_head_off, stride_cb, stride_cs, stride_vb,
                        stride_vs, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                        V_BLOCK: tl.constexpr):  # fmt: skip
    """K and V cache offsets of the keys ``start + keys`` (``keys`` of any shape, in 0 .. BLOCK_N) of a
    tile that lies inside one block (``start`` a multiple of BLOCK_N, which divides BLOCK_SIZE)."""
    block_id = tl.load(table + start // BLOCK_SIZE).to(tl.int64)
    slot = tl.multiple_of(start % BLOCK_SIZE, BLOCK_N) + keys
    k_off = block_id * stride_cb + slot * stride_cs + kv_head_off
    return k_off, _v_offsets(block_id, slot, stride_vb, stride_vs, BLOCK_SIZE, V_BLOCK) + v_head_off


@triton.jit
def _v_offsets(block_id, row, stride_vb, stride_vs, BLOCK_SIZE: tl.constexpr, V_BLOCK: tl.constexpr):
    """Where row ``row`` of K block ``block_id`` lies in a V cache of V_BLOCK-slot blocks (a key-major
    V's may be smaller, reference.key_major; else the same block and row)."""
    if V_BLOCK == BLOCK_SIZE:
        return block_id * stride_vb + row * stride_vs
    return (block_id * (BLOCK_SIZE // V_BLOCK) + row // V_BLOCK) * stride_vb + (row % V_BLOCK) * stride_vs


@triton.jit
def _attend_tile(m_i, l_i, acc, q, qk_scale, v_unit, k_cache_ptr, v_cache_ptr, table, tile_start, end,
                 kv_head_off, v_head_off, stride_cb, stride_cs, stride_vb, stride_vs, stride_vd,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
                 FP16_DOT: tl.constexpr, V_STAGED: tl.constexpr, V_KEY_MAJOR: tl.constexpr,
                 V_BLOCK: tl.constexpr, ZERO_STALE_V: tl.constexpr):  # fmt: skip
    """One tile of BLOCK_N keys from ``tile_start`` into the online softmax's running max ``m_i``,
    sum ``l_i`` (base 2) and unnormalised output ``acc``. MASKED: keys from ``end`` on are not
    attended (else the whole tile is below ``end``)."""
    k, v, key_mask = load_kv_tile(
        k_cache_ptr, v_cache_ptr, table, tile_start, end, kv_head_off, v_head_off, stride_cb, stride_cs,
        stride_vb, stride_vs, stride_vd, q.dtype, HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASKED, FP8, V_KEY_MAJOR,
        V_BLOCK, ZERO_STALE_V,
    )  # fmt: skip
    if V_STAGED:  # see FP8_V_STAGED
        v = v * tl.full([], v_unit, q.dtype)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [GROUP_PAD, BLOCK_N]
    if not FP16_DOT:
        s = s * qk_scale
    if MASKED:
        s = tl.where(key_mask[None, :], s, float("-inf"))
    return online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION: tl.constexpr, KEYS_AXIS: tl.constexpr = 1,
                        MAY_BE_EMPTY: tl.constexpr = False):  # fmt: skip
    """A tile's scores ``s`` (base 2, -inf where masked; the keys along KEYS_AXIS, its last) and
    values ``v`` into the running max, sum and unnormalised output. MAY_BE_EMPTY: a row may have
    seen no key yet, its max still -inf, where exp2(-inf - -inf) would be NaN. Shared with the
    prefill kernel."""
    m_new = tl.maximum(m_i, tl.max(s, axis=KEYS_AXIS))
    m_use = m_new
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - tl.expand_dims(m_use, KEYS_AXIS))
    l_i = l_i * alpha + tl.sum(p, axis=KEYS_AXIS)
    acc = acc * tl.expand_dims(alpha, KEYS_AXIS) + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _merge_group(partial_ptr, lse_ptr, out_ptr, seq, kv_head, used, num_heads, num_splits, stride_ob,
                 stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr,
                 CHUNK: tl.constexpr, SPLITS_PAD: tl.constexpr):  # fmt: skip
    """Merge the ``used`` splits' partial outputs of the group's heads into ``out``, each weighted by
    ``exp(lse_split - lse_total)``, in split order, CHUNK splits at a time. ``G``: GROUP rounded up to a
    power of two. Loads bypass L1 (.cg): other programs wrote them."""
    g = tl.arange(0, G)
    g_ok = g < GROUP
    rows = seq * num_heads + kv_head * GROUP + g  # [G] rows of lse / partial
    all_splits = tl.arange(0, SPLITS_PAD)
    lse_mask = g_ok[:, None] & (all_splits < used)[None, :]
    lse_all = tl.load(lse_ptr + rows[:, None] * num_splits + all_splits[None, :], mask=lse_mask,
                      other=float("-inf"), cache_modifier=".cg")  # fmt: skip
    top = tl.max(lse_all, axis=1)
    total = tl.sum(tl.exp2(lse_all - top[:, None]), axis=1)  # >= 1: the top split weighs 1
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([G, HEAD_DIM], dtype=tl.float32)
    for first in range(0, used, CHUNK):
        splits = first + tl.arange(0, CHUNK)
        ok = g_ok[:, None] & (splits < used)[None, :]  # [G, CHUNK]
        at = rows[:, None] * num_splits + splits[None, :]
        lse = tl.load(lse_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp2(lse - top[:, None])
        part = tl.load(partial_ptr + at[:, :, None] * HEAD_DIM + dims[None, None, :], mask=ok[:, :, None],
                       other=0.0, cache_modifier=".cg")  # fmt: skip
        acc += tl.sum(part * weight[:, :, None], axis=1)
    out = acc / total[:, None]
    heads = kv_head * GROUP + g
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])  # fmt: skip


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """K and V hold the same slots, V perhaps in smaller blocks (reference.key_major); K's rows are
    contiguous. Shared with the prefill, store and qkv_prep launchers."""
    (num_blocks, block_size, *rest), (v_blocks, v_block, *v_rest) = k_cache.shape, v_cache.shape
    assert rest == v_rest and block_size % v_block == 0 and num_blocks * block_size == v_blocks * v_block, (
        f"K cache {tuple(k_cache.shape)} and V cache {tuple(v_cache.shape)} must hold the same slots"
    )
    assert k_cache.stride(3) == 1, "the K cache's head_dim must be contiguous"


def choose_num_splits(batch: int, num_kv_heads: int, max_context_len: int, block_n: int = 64) -> int:
    """Enough programs to fill every SM a few times over, but no split shorter than two tiles.

    Measured on H200 (16/8 heads, head_dim 128): targets of 2-4 programs per SM are within noise
    of each other; batches of 64+ need no split at all (one split reads at ~98% of copy bandwidth).
    """
    target_programs = 3 * NUM_SMS
    programs = batch * num_kv_heads
    if programs >= target_programs:
        return 1
    want = math.ceil(target_programs / programs)
    most = max(1, max_context_len // (2 * block_n))
    return max(1, min(want, most, MAX_SPLITS))


# The merge's arrival counters, one per (sequence, KV head), in one buffer per device: made once
# (CUDA graphs keep its address) and never freed. Every launch leaves all of them at 0, so launches
# on one stream share it; two streams must not run the kernel at once on one device (the engine runs
# each device's forward on one stream).
MAX_COUNTERS = 1 << 16
_counters: dict[tuple[str, int | None], torch.Tensor] = {}


def _counters_for(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _counters:
        _counters[key] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counters[key]


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [batch, max_blocks] int
    context_lens: torch.Tensor,  # [batch] int, keys per sequence (including the new token)
    scale: float,
    max_context_len: int | None = None,  # an upper bound; fixes num_splits (e.g. max_model_len)
    num_splits: int | None = None,  # override the heuristic
    k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
    v_scale: torch.Tensor | None = None,
    block_n: int = 64,  # keys per tile (the split heuristic assumes 64)
    out: torch.Tensor | None = None,  # [batch, num_heads, head_dim] to write into (a view is fine)
    launch: dict | None = None,  # num_warps / num_stages in place of 4 / 3, warp_split (benchmark sweeps)
    order: torch.Tensor | None = None,  # [2, batch] int32: rows longest context first, their lengths
) -> torch.Tensor:  # [batch, num_heads, head_dim]
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim
    assert head_dim in (16, 32, 64, 128, 256), "head_dim must be a power of two"
    check_kv_caches(k_cache, v_cache)
    assert q.stride(2) == 1
    group = num_heads // num_kv_heads
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size  # from shapes only: no host sync
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (k_scale is not None and v_scale is not None), "an fp8 KV cache needs its scales"
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context_len, block_n)
    assert 1 <= num_splits <= MAX_SPLITS, f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}"

    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1
    if num_splits == 1:
        partial = lse = counters = out  # unread: the split kernel writes the result directly
    else:
        assert batch * num_kv_heads <= MAX_COUNTERS, f"split decode: {MAX_COUNTERS} sequence-heads at most"
        partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        counters = _counters_for(q.device)
    merge_g = triton.next_power_of_2(group)
    assert order is None or (order.shape == (2, batch) and order.stride(1) == 1), "order: [2, batch] int32"
    v_key_major = v_cache.stride(1) == 1
    # Measured on H200 (bf16, head_dim 128): 64-key tiles, 4 warps and 3 stages in flight read
    # K/V at ~95% of copy bandwidth; 32-key tiles fall to ~80%, 128-key tiles or 8 warps are no better.
    # A key-major fp8 V: 5 stages (bench_kernels.py --fp8-sweep). With ONE_LOOP, 3 and 5 stages were
    # within 7% of each other at batches 8-256 and 8 warps 5-40% slower (H200, lengths 100..2048).
    # 64-key tiles: on an H100 3-9% faster than 128 at batches 8-256 (at batch 1 equal in one call,
    # 1.8 us slower in another) and the fp8 reference workload 1.6% faster. On an H200 not yet timed
    # as shipped: with a 96-register cap 2-4% faster at batches 128-256 and 3-9% slower at 8-64
    # (benchmarks/README.md, sessions 29, 30, 35 and 36).
    launch = {"num_warps": 4, "num_stages": 5 if fp8 and v_key_major else 3} | (launch or {})
    warp_split = launch.pop("warp_split", 1)
    one_loop = fp8 and v_key_major and block_size % block_n == 0
    assert warp_split == 1 or (one_loop and block_n % (16 * warp_split) == 0), (
        f"warp_split {warp_split} needs an fp8 cache with key-major V (reference.key_major) and a block_n "
        f"that divides the block size with 16 keys or more a warp; got block_n {block_n}, block size "
        f"{block_size}, {k_cache.dtype}, V key-major {v_key_major}"
    )
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, context_lens if order is None else order, out,
        partial, lse, counters,
        k_scale if fp8 else q, v_scale if fp8 else q,  # unread unless fp8
        scale * math.log2(math.e),
        1.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *v_cache.stride(),
        block_tables.stride(0),
        0 if order is None else order.stride(0),
        out.stride(0), out.stride(1),
        num_heads,
        num_splits,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        V_BLOCK=v_cache.shape[1],
        BLOCK_N=block_n,
        ONE_SPLIT=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=fp8,
        FP16_DOT=fp8 and q.dtype == torch.bfloat16,
        V_STAGED=fp8 and FP8_V_STAGED and v_cache.stride(3) == 1,  # key-major V needs no transpose
        MERGE_G=merge_g,
        MERGE_CHUNK=max(1, 4096 // (merge_g * head_dim)),  # 32 float32 registers a thread at 4 warps
        SPLITS_PAD=MAX_SPLITS,
        ORDERED=order is not None,
        V_KEY_MAJOR=v_key_major,
        ONE_LOOP=one_loop,
        MASKED_STAGES=launch["num_stages"] if one_loop else 1,
        WARP_SPLIT=warp_split,
        **launch,
        **pdl.launch_options(q),
    )  # fmt: skip
    return out
