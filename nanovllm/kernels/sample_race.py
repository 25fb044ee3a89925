"""Temperature sampling in one pass over the logits (Triton), for the sampler's common case.

The sampler draws with the exponential race, ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)``. Taking
logs, and with ``p = softmax(l / T)`` whose normaliser is common to the row, that is::

    argmax_i  l_i / T + G_i        G_i = -log(E_i) = -log(-log U_i), U_i ~ Uniform(0, 1)

(the Gumbel-max trick), so no softmax is needed: one read of each logit, in the model's dtype. The
kernel takes the logs in base 2 (the GPU has a one-instruction log2), which scales the score by
1 / ln 2 and shifts it by a constant: the same argmax.

A row of 151,936 logits in one program leaves an H200 mostly idle, and a fused softmax over it
costs three passes (measured: 457 us a step at 256 rows, plus 102 us to widen the logits to
float32). Here each program takes one chunk of one row and writes that chunk's best score and its
token id; a second pass (plain torch, ``rows x chunks`` values) picks each row's best chunk::

    logits [rows, vocab]  --chunk kernel-->  best [rows, chunks] (score, id)  --argmax-->  [rows]

Ties go to the lowest token id, as ``torch.argmax``. Rows with temperature 0 (and greedy rows of
``greedy_mask``) take the plain argmax of their logits, without noise. The uniforms come from a
32-bit integer hash of each element's (row, token) position and a per-call key.
"""

import math
import os

import torch
import triton
import triton.language as tl

LN2 = tl.constexpr(math.log(2.0))
FAST_LOG = True  # lg2.approx on the GPU (see _log2); a switch, so benchmarks/bench_race.py can time both


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 of float32 x > 0. FAST: the GPU's ``lg2.approx`` (one special-function instruction,
    relative error ~2^-22); else ``tl.log2``, libdevice's ~30-instruction polynomial (also what the
    interpreter runs). With two of those per logit the kernel was bound by arithmetic, not memory:
    race_sample took 135 us at 256 rows of 151,936 on an H200, where reading the bf16 logits takes
    ~20 us; 74 us with lg2.approx (benchmarks/bench_race.py)."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip
    return tl.log2(x)


@triton.jit(do_not_specialize=["key"])  # a new key every call must not mean a new compile
def _race_chunk_kernel(
    logits_ptr,  # [rows, vocab], any float dtype
    temperatures_ptr,  # [rows] float32
    greedy_ptr,  # [rows] bool (HAS_GREEDY only)
    best_score_ptr,  # [rows, num_chunks] float32
    best_id_ptr,  # [rows, num_chunks] int64
    key,  # int32 >= 0, mixed from the call's seed
    vocab,
    stride_row,
    num_chunks,
    HAS_GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
    FAST_LOG: tl.constexpr,  # compiled for a GPU (not the interpreter): see _log2
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < vocab
    logits = tl.load(logits_ptr + row * stride_row + offs, mask=inside, other=-float("inf")).to(tl.float32)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature <= 0.0
    if HAS_GREEDY:
        greedy = greedy | (tl.load(greedy_ptr + row).to(tl.int32) != 0)
    if greedy:
        score = logits
    else:
        # Uniforms from one round of the "lowbias32" integer hash of (element index xor key): two
        # multiplies an element, where Philox (tl.rand) costs ~20 and took 233 us at 256 rows.
        bits = (row * vocab + offs).to(tl.uint32) ^ key
        bits = bits ^ (bits >> 16)
        bits = (bits * 0x7FEB352D).to(tl.uint32)  # the cast: the CPU interpreter widens
        bits = bits ^ (bits >> 15)
        bits = (bits * 0x846CA68B).to(tl.uint32)
        bits = bits ^ (bits >> 16)
        # 23 bits: (b + 0.5) / 2**23 <= 1 - 2**-24, a float32 below 1 (with 24 bits the top value
        # rounded to 1.0, whose noise is +inf: that token won whatever its logit)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        # -log2 u >= 2**-24 (its least true value is 2**-23.5): lg2.approx is off by up to ~2**-22.6
        # near 1, where it could give 0 (noise +inf) or a positive log (noise NaN)
        neg_log2_u = tl.maximum(-_log2(u, FAST_LOG), 5.9604645e-08)
        # l/T - ln(-ln u) = ln 2 * (l / (T ln 2) - log2(-log2 u)) + a constant: the same argmax
        score = logits * (1.0 / (temperature * LN2)) - _log2(neg_log2_u, FAST_LOG)
    score = tl.where(inside, score, -float("inf"))
    best = tl.argmax(score, axis=0, tie_break_left=True)
    tl.store(best_score_ptr + row * num_chunks + chunk, tl.max(score, axis=0))
    tl.store(best_id_ptr + row * num_chunks + chunk, chunk * BLOCK + best)


def _mix32(x: int) -> int:
    """The same 32-bit hash on the host: spreads consecutive seeds over unrelated keys."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def chunk_size(rows: int) -> int:
    """Logits per program: small chunks for few rows (enough programs to fill the GPU), large ones
    for many rows (fewer partial results)."""
    return 1024 if rows < 32 else 8192


def race_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    greedy_mask: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` [rows, vocab] (int64), sampled from ``softmax(l / T)``;
    rows with ``T <= 0`` or ``greedy_mask`` set take the argmax. ``seed`` (default: drawn from
    torch's global CPU generator, so ``torch.manual_seed`` makes runs repeat) keys the noise."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    key = _mix32(seed ^ 0x9E3779B9) & 0x7FFFFFFF  # an int32 argument: one compiled variant
    block = chunk_size(rows)
    num_chunks = triton.cdiv(vocab, block)
    best_score = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_id = torch.empty(rows, num_chunks, dtype=torch.int64, device=logits.device)
    has_greedy = greedy_mask is not None
    # lg2.approx is PTX inline assembly: NVIDIA GPUs only (not ROCm, not the interpreter)
    nvidia = logits.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
    fast_log = FAST_LOG and nvidia
    _race_chunk_kernel[(rows, num_chunks)](
        logits,
        temperatures,
        greedy_mask if has_greedy else temperatures,
        best_score,
        best_id,
        key,
        vocab,
        logits.stride(0),
        num_chunks,
        HAS_GREEDY=has_greedy,
        BLOCK=block,
        FAST_LOG=fast_log,
        num_warps=8 if block >= 4096 else 4,
    )
    chunk = best_score.argmax(dim=1, keepdim=True)
    return best_id.gather(1, chunk).squeeze(1)


def race_sample_ref(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    uniform: torch.Tensor,
    greedy_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch, the same arithmetic with the uniforms given: the oracle of the kernel's tests."""
    logits = logits.float()
    greedy = temperatures <= 0
    if greedy_mask is not None:
        greedy = greedy | greedy_mask
    safe_t = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    scores = logits / (safe_t.unsqueeze(1) * math.log(2.0)) - torch.log2(-torch.log2(uniform))
    scores = torch.where(greedy.unsqueeze(1), logits, scores)
    return scores.argmax(dim=1)
