"""y = x @ weight^T for a decode step of a few rows (Triton GEMV), in place of cuBLAS.

At batch 1 each projection reads its whole weight to produce one row, so it is bound by memory
bandwidth, not arithmetic. cuBLAS's kernels for M=1 reach only ~1.0-1.5 TB/s on an H200 at the
Qwen3-0.6B shapes (and split K=2048 into a second, reduce kernel); this kernel aims at the copy
bandwidth. It runs when ``LinearBase.linear`` (and the LM head) see a CUDA input of
1 <= M <= ``GEMV_MAX_ROWS`` rows and a float weight (packed GGUF weights keep their own kernel):
in practice the decode steps of batch <= 4, captured in their CUDA graphs.

How it splits the work::

    weight [N, K]  (rows contiguous along K)
    ┌──────────────┬──────────────┐  program (n, s) reads rows n*BLOCK_N ... +BLOCK_N of
    │ (0, 0)       │ (0, 1)       │  K-slice s in tiles [BLOCK_N, BLOCK_K] (16-byte loads along K),
    ├──────────────┼──────────────┤  multiplies each by the broadcast x chunk [M, BLOCK_K] of every
    │ (1, 0)       │ (1, 1)       │  row and reduces along K into M x BLOCK_N float32 accumulators,
    └──────────────┴──────────────┘  so each weight byte is read once whatever M is.

No ``tl.dot``: with M <= 4 the tensor cores would idle, and the interpreter has no bf16 dot.
One launch keeps up to 4 rows, each in a [BLOCK_N] accumulator of its own (more rows: more
launches). To fill the GPU the grid needs some hundreds of programs. The default answer for a
small N with a large K (down_proj 3072->1024) is a small BLOCK_N (2-4 rows of the weight per
program, 256-512 programs) and no second kernel; a config may instead split K (SPLIT_K > 1): each
slice writes float32 partial sums and a second kernel adds them in a fixed order (deterministic,
unlike atomics) and rounds once. The benchmark times both.

Block sizes come from ``GEMV_CONFIGS`` (one dict, tuned with ``benchmarks/bench_gemv.py``), else
from ``default_config``; never autotuned, since the first call may run inside a graph capture.

``act="silu_mul"``: x is [M, 2K] = [gate | up] and the kernel multiplies by silu(gate) * up,
computed in float32 and rounded once to x's dtype, as the compiled ``silu_and_mul`` does, so the
MLP's down projection needs no activation kernel of its own.

``gemv_rms_norm``: the decoder's residual add and RMSNorm run as the GEMV's prologue, so the qkv and
gate_up projections at batch 1-2 need no norm kernel before them. K is one tile there (1024 at
Qwen3-0.6B), so every program loads its weight rows, its rows of ``x`` and ``residual`` (2 KB each,
from L2 after the first program) and the norm weight at once, takes the sum of squares and
normalises, rounding where ``add_rms_norm`` rounds: the sum, the normalised value and its product
with the norm weight each to x's dtype. The programs of the first column block (pid_n == 0) also
write the new residual (the sum), to a tensor of its own, since other programs still read the old one.

With PDL (kernels/pdl.py, Hopper) each program loads its first weight tile before waiting for the
kernel before it, so at batch 1 the weight reads of one projection overlap the end of the last.

Environment: ``NANOVLLM_GEMV=0`` turns the kernel off; ``NANOVLLM_GEMV_MAX_ROWS`` (default 4) sets
the most rows it takes. Both are read once, at import.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanovllm.kernels import pdl
from nanovllm.kernels.pdl import wait_for_previous


def _max_rows_from_env() -> int:
    if os.environ.get("NANOVLLM_GEMV", "1") == "0":
        return 0
    value = os.environ.get("NANOVLLM_GEMV_MAX_ROWS", "4")
    try:
        return int(value)
    except ValueError:
        msg = f"NANOVLLM_GEMV_MAX_ROWS={value!r} is not an integer (use e.g. 4, or 0 for off)"
        raise ValueError(msg) from None


GEMV_MAX_ROWS = _max_rows_from_env()


class GemvConfig(NamedTuple):
    block_n: int  # weight rows per program (a power of two)
    block_k: int  # columns per loaded tile (a power of two)
    split_k: int = 1  # K slices, each its own program; > 1 adds the deterministic reduce kernel
    num_warps: int = 4


# (N, K) -> config, or None to leave that shape to cuBLAS. (N, K, M) entries, where present, win
# for that M. N and K are the local (tensor-parallel shard) sizes. Tuned with bench_gemv.py --quick
# on an H200 (2026-11-28; us at M = 1, ours vs cuBLAS): qkv 4.05 vs 5.43, o 3.43 vs 12.96, gate_up
# 5.51 vs 6.56, down 4.00 vs 7.61, lm_head 75.9 vs 83.5. At M = 4 cuBLAS wins for qkv, gate_up and
# lm_head, and at M = 2 for gate_up: those are None.
GEMV_CONFIGS: dict[tuple[int, ...], GemvConfig | None] = {
    (4096, 1024): GemvConfig(2, 1024),  # Qwen3-0.6B qkv_proj
    (4096, 1024, 2): GemvConfig(4, 1024),
    (4096, 1024, 4): None,
    (1024, 2048): GemvConfig(2, 2048),  # o_proj
    (1024, 2048, 2): GemvConfig(4, 2048),
    (1024, 2048, 4): GemvConfig(4, 2048),
    (6144, 1024): GemvConfig(2, 1024),  # gate_up_proj
    (6144, 1024, 2): None,
    (6144, 1024, 4): None,
    # down_proj, one masked 4096-wide tile. At M = 1 BLOCK_N 4 (256 programs) beat 2 in the engine's
    # own decode step (PDL, bench_decode_variants.py on an H200, 2026-12-04: batch 1 0.861 against
    # 0.880 ms a step; 1 row a program: 0.914), though alone bench_gemv preferred 2.
    (1024, 3072): GemvConfig(4, 4096),
    (1024, 3072, 2): GemvConfig(2, 4096),
    (1024, 3072, 4): GemvConfig(4, 4096),
    (151936, 1024): GemvConfig(2, 1024),  # lm_head
    (151936, 1024, 2): GemvConfig(16, 256),
    (151936, 1024, 4): None,
}

# gemv_rms_norm's own block sizes, (N, K, M) -> config: each program also reads its rows of x and the
# residual, so fewer, larger programs pay. bench_gemv.py --norm on an H200 (2026-11-29; us, the
# fused kernel against add_rms_norm + the table's GEMV): qkv M=1 4.73 vs 6.32, M=2 6.00 vs 8.19;
# gate_up M=1 6.13 vs 7.93 (BLOCK_N 2: 4.82 and 6.65). Shapes not here use GEMV_CONFIGS.
NORM_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (4096, 1024, 1): GemvConfig(4, 1024),
    (4096, 1024, 2): GemvConfig(8, 1024),
    (6144, 1024, 1): GemvConfig(4, 1024),
}

TARGET_PROGRAMS = 256  # about two per SM on an H100/H200 (132 SMs)
TILE = 8192  # weight elements per loaded tile: 64 per thread at 4 warps, eight 16-byte loads


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def default_config(n: int, k: int) -> GemvConfig:
    """A shape outside the table. The loads of the K loop are not software-pipelined (there is no
    tl.dot), so each tile costs a DRAM round trip: BLOCK_K as large as K allows (up to 2048, a
    divisor of K where one >= 64 exists, so no masked tail), then BLOCK_N for tiles of ~TILE
    elements, smaller where that leaves fewer than ~TARGET_PROGRAMS programs."""
    block_k = min(2048, triton.next_power_of_2(k))
    divisor = block_k
    while divisor >= 64 and k % divisor:
        divisor //= 2
    block_k = divisor if divisor >= 64 else block_k
    block_n = max(1, min(TILE // block_k, _pow2_floor(n // TARGET_PROGRAMS)))
    return GemvConfig(block_n, block_k)


def config_for(m: int, n: int, k: int) -> GemvConfig | None:
    for key in ((n, k, m), (n, k)):
        if key in GEMV_CONFIGS:
            return GEMV_CONFIGS[key]
    return default_config(n, k)


def gemv_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` should run for this input (not a test of validity: ``gemv`` checks that)."""
    m = x.shape[0] if x.dim() == 2 else 0
    return (
        1 <= m <= GEMV_MAX_ROWS
        and x.is_cuda
        and weight.dim() == 2
        and weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.dtype == weight.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and config_for(m, *weight.shape) is not None
    )


@triton.jit
def _row_x(x_row_ptr, ks, mask, K, SILU_MUL: tl.constexpr):
    """A chunk [BLOCK_K] of one row of x in float32 (silu(gate) * up with SILU_MUL, rounded once)."""
    if SILU_MUL:
        gate = tl.load(x_row_ptr + ks, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row_ptr + K + ks, mask=mask, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up
        return act.to(x_row_ptr.dtype.element_ty).to(tl.float32)  # rounded once, as silu_and_mul
    return tl.load(x_row_ptr + ks, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_dot(x_row_ptr, w, ks, k_mask, K, ok, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr):
    """One row's contribution [BLOCK_N] of the tile ``w`` [BLOCK_N, BLOCK_K] (zeros if not ``ok``)."""
    mask = ok if EVEN_K else k_mask & ok  # a scalar mask keeps the loads vectorised
    return tl.sum(w * _row_x(x_row_ptr, ks, mask, K, SILU_MUL)[None, :], axis=1)


@triton.jit
def _normed_row_dot(x_row_ptr, res_row_ptr, res_out_row_ptr, w, norm_w, ks, mask, K, eps, write_res,
                    HAS_RES: tl.constexpr):  # fmt: skip
    """As ``_row_dot`` for a row that is whole in this tile, taken through (add +) RMSNorm first:
    h = x (+ residual), rounded as the unfused add rounds; ``write_res`` programs store h."""
    dtype = x_row_ptr.dtype.element_ty
    h = tl.load(x_row_ptr + ks, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h = (h + tl.load(res_row_ptr + ks, mask=mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        tl.store(res_out_row_ptr + ks, h.to(dtype), mask=mask & write_res)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / K + eps)
    xs = ((h * rstd).to(dtype).to(tl.float32) * norm_w).to(dtype).to(tl.float32)
    return tl.sum(w * xs[None, :], axis=1)


@triton.jit
def _weight_tile(w_rows, ks, k_end, col_ok, EVEN_K: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_K] at columns ``ks``, in float32."""
    if EVEN_K:
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0.0)
    else:
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < k_end)[None, :], other=0.0)
    return w.to(tl.float32)


@triton.jit
def _rows_dot(x_ptr, stride_xm, w, ks, k_end, K, M, acc0, acc1, acc2, acc3, BLOCK_M: tl.constexpr,
              EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr):  # fmt: skip
    """Each kept row's contribution of the tile ``w`` added to its accumulator."""
    k_mask = ks < k_end
    acc0 += _row_dot(x_ptr, w, ks, k_mask, K, M > 0, EVEN_K, SILU_MUL)
    if BLOCK_M > 1:
        acc1 += _row_dot(x_ptr + stride_xm, w, ks, k_mask, K, M > 1, EVEN_K, SILU_MUL)
    if BLOCK_M > 2:
        acc2 += _row_dot(x_ptr + 2 * stride_xm, w, ks, k_mask, K, M > 2, EVEN_K, SILU_MUL)
        acc3 += _row_dot(x_ptr + 3 * stride_xm, w, ks, k_mask, K, M > 3, EVEN_K, SILU_MUL)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_row(out_ptr, acc, bias, cols, col_ok, ok, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if SPLIT:
        tl.store(out_ptr + cols, acc, mask=col_ok & ok)
    else:
        if HAS_BIAS:
            acc += bias
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok & ok)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] (or [M, 2K] = [gate | up] with SILU_MUL); M <= 4
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N] in x's dtype, or [SPLIT_K, M, N] float32 partial sums when SPLIT
    res_ptr,  # [M, K] the residual added to x before the norm (NORM and HAS_RES only)
    res_out_ptr,  # [M, K] where x + residual goes (NORM and HAS_RES only)
    norm_w_ptr,  # [K] the RMSNorm weight (NORM only)
    eps,
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,
    stride_rm,  # rows of res_ptr and res_out_ptr
    BLOCK_M: tl.constexpr,  # 1, 2 or 4: the rows kept, each in an accumulator of its own
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # every K slice is whole tiles: no mask along K
    SPLIT: tl.constexpr,
    SILU_MUL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,  # x is the input of (add +) RMSNorm, applied on the fly; K is one tile
    HAS_RES: tl.constexpr,
    PDL: tl.constexpr,  # launched early (kernels/pdl.py): weights load before wait_for_previous
):
    # Everything stays 2-D ([BLOCK_N, BLOCK_K] tiles, [BLOCK_N] sums): a 3-D [M, N, K] broadcast
    # would make the compiler move the weight tile between layouts through shared memory.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
    if NORM:  # the whole row in one tile (gemv_rms_norm sees to it): all loads issued up front
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=col_ok[:, None] & k_mask[None, :], other=0.0).to(
            tl.float32
        )
        norm_w = tl.load(norm_w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        wait_for_previous(PDL)  # weights above; x and the residual below come from earlier kernels
        write_res = pid_n == 0
        acc0 = _normed_row_dot(x_ptr, res_ptr, res_out_ptr, w, norm_w, offs_k, k_mask & (M > 0), K, eps,
                               write_res, HAS_RES)  # fmt: skip
        if BLOCK_M > 1:
            acc1 = _normed_row_dot(
                x_ptr + stride_xm, res_ptr + stride_rm, res_out_ptr + stride_rm, w, norm_w, offs_k,
                k_mask & (M > 1), K, eps, write_res, HAS_RES,
            )  # fmt: skip
        if BLOCK_M > 2:
            acc2 = _normed_row_dot(
                x_ptr + 2 * stride_xm, res_ptr + 2 * stride_rm, res_out_ptr + 2 * stride_rm, w, norm_w,
                offs_k, k_mask & (M > 2), K, eps, write_res, HAS_RES,
            )  # fmt: skip
            acc3 = _normed_row_dot(
                x_ptr + 3 * stride_xm, res_ptr + 3 * stride_rm, res_out_ptr + 3 * stride_rm, w, norm_w,
                offs_k, k_mask & (M > 3), K, eps, write_res, HAS_RES,
            )  # fmt: skip
    else:
        # The first tile's weights load before the wait: they never depend on the kernel before,
        # so with PDL the load overlaps it. Later tiles load as the loop reaches them.
        ks = k_start + offs_k
        w = _weight_tile(w_rows, ks, k_end, col_ok, EVEN_K)
        wait_for_previous(PDL)
        acc0, acc1, acc2, acc3 = _rows_dot(x_ptr, stride_xm, w, ks, k_end, K, M, acc0, acc1, acc2, acc3,
                                           BLOCK_M, EVEN_K, SILU_MUL)  # fmt: skip
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            ks = k0 + offs_k
            w = _weight_tile(w_rows, ks, k_end, col_ok, EVEN_K)
            acc0, acc1, acc2, acc3 = _rows_dot(x_ptr, stride_xm, w, ks, k_end, K, M, acc0, acc1, acc2,
                                               acc3, BLOCK_M, EVEN_K, SILU_MUL)  # fmt: skip
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS and not SPLIT:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out_ptr += pid_k * stride_os
    _store_row(out_ptr, acc0, bias, cols, col_ok, M > 0, SPLIT, HAS_BIAS)
    if BLOCK_M > 1:
        _store_row(out_ptr + stride_om, acc1, bias, cols, col_ok, M > 1, SPLIT, HAS_BIAS)
    if BLOCK_M > 2:
        _store_row(out_ptr + 2 * stride_om, acc2, bias, cols, col_ok, M > 2, SPLIT, HAS_BIAS)
        _store_row(out_ptr + 3 * stride_om, acc3, bias, cols, col_ok, M > 3, SPLIT, HAS_BIAS)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr,  # [SPLIT_K, M, N] float32
    bias_ptr,
    out_ptr,  # [M, N]
    M,
    N,
    stride_om,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum every run
        acc += tl.load(partial_ptr + (s * M + row) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, weight: torch.Tensor, x_k: int) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gemv: x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != x_k:
        raise ValueError(f"gemv: x has {x.shape[1]} columns, weight {tuple(weight.shape)} needs {x_k}")
    if x.dtype != weight.dtype:
        raise ValueError(f"gemv: x is {x.dtype} but weight is {weight.dtype}; cast one to the other")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv: x and weight need contiguous rows (stride 1 along K); call .contiguous()")


def _launch(x, weight, out, bias, config, act=None, norm=None) -> torch.Tensor:
    """Run the kernel (and the split-K reduce). ``norm``: (residual or None, residual_out, weight, eps)."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    if m == 0:
        return out
    cfg = config or config_for(m, n, k) or default_config(n, k)
    if norm is not None:  # the kernel keeps the row in one tile
        cfg = cfg._replace(block_k=max(cfg.block_k, triton.next_power_of_2(k)), split_k=1)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    even_k = k % k_per_split == 0  # every slice whole (k_per_split is whole tiles)
    grid = (triton.cdiv(n, cfg.block_n), split_k)
    has_bias = bias is not None
    residual, res_out, norm_w, eps = norm if norm is not None else (None, x, x, 0.0)
    has_res = residual is not None
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    for row in range(0, m, 4):  # the kernel keeps at most 4 rows; more re-read the weight
        rows = min(4, m - row)
        _gemv_kernel[grid](
            x[row:], weight, bias if has_bias else x, partial[..., row:, :],
            residual[row:] if has_res else x, res_out[row:], norm_w, eps, rows, n, k, k_per_split,
            x.stride(0), weight.stride(0), partial.stride(-2), partial.stride(0) if split_k > 1 else 0,
            res_out.stride(0),
            BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k,
            SPLIT=split_k > 1, SILU_MUL=act == "silu_mul", HAS_BIAS=has_bias and split_k == 1,
            NORM=norm is not None, HAS_RES=has_res, num_warps=cfg.num_warps, **pdl.launch_options(x),
        )  # fmt: skip
    if split_k > 1:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(triton.cdiv(n, block), m)](
            partial, bias if has_bias else partial, out, m, n, out.stride(0),
            SPLIT_K=split_k, BLOCK=block, HAS_BIAS=has_bias, num_warps=4, **pdl.launch_options(x),
        )  # fmt: skip
    return out


def _out(out: torch.Tensor | None, x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        want = f"[{m}, {n}] {x.dtype} with stride 1 along N"
        raise ValueError(f"gemv: out must be {want}, got {tuple(out.shape)} {out.dtype}")
    return out


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    act: str | None = None,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ weight[N, K]^T (+ bias), float32 accumulation, in x's dtype.

    ``act="silu_mul"``: x is [M, 2K] and the product is taken with silu(gate) * up instead.
    ``config``: block sizes to use instead of the table's (the benchmark sweeps them)."""
    if act not in (None, "silu_mul"):
        raise ValueError(f"gemv: unknown act {act!r} (None or 'silu_mul')")
    k = weight.shape[-1]
    _check(x, weight, 2 * k if act == "silu_mul" else k)
    out = _out(out, x, x.shape[0], weight.shape[0])
    return _launch(x, weight, out, bias, config, act=act)


def gemv_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) @ weight^T (+ bias), x + residual): ``add_rms_norm`` (or ``rms_norm``
    when ``residual`` is None, which returns x itself as the residual) and the GEMV in one kernel."""
    _check(x, weight, weight.shape[1])
    like_x = f"[{x.shape[1]}] {x.dtype}"
    if norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype:
        got = f"{tuple(norm_weight.shape)} {norm_weight.dtype}"
        raise ValueError(f"gemv_rms_norm: the norm weight must be {like_x}, got {got}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"gemv_rms_norm: residual must be {tuple(x.shape)} {x.dtype} like x")
    if residual is not None and residual.stride(1) != 1:
        raise ValueError("gemv_rms_norm: residual needs contiguous rows; call .contiguous()")
    res_out = x if residual is None else torch.empty_like(x)
    m, n = x.shape[0], weight.shape[0]
    config = config or NORM_CONFIGS.get((n, weight.shape[1], m))
    out = _launch(x, weight, _out(None, x, m, n), bias, config, norm=(residual, res_out, norm_weight, eps))
    return out, res_out
