"""Python entry points of the CPU C kernels: torch tensors in, torch tensors out.

Each function checks what the C side assumes (dtype, contiguity, shapes) and passes data pointers; the
library comes from ``build.load()``. Callers check ``available()`` first and keep a torch path.
"""

import torch

from nanovllm.kernels.cpu import build

QTYPE_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
KV_TYPE_IDS = {torch.float32: 0, torch.float16: 1}  # cpu_kernels.h: KV_F32, KV_F16
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def available() -> bool:
    return build.load() is not None


def _check_raw(raw: torch.Tensor, qtype: str) -> int:
    """The number of weights a row of ``raw`` (uint8 [rows, row_bytes], contiguous) holds."""
    if raw.dtype != torch.uint8 or raw.dim() != 2 or not raw.is_contiguous() or raw.is_cuda:
        raise ValueError("a quantised weight must be a contiguous uint8 [rows, row_bytes] CPU tensor")
    if raw.shape[1] % BLOCK_BYTES[qtype]:
        raise ValueError(f"{qtype} rows are whole {BLOCK_BYTES[qtype]}-byte blocks, got {raw.shape[1]} bytes")
    return raw.shape[1] // BLOCK_BYTES[qtype] * 32


class QMatmul:
    """``x @ W.T`` for one quantised matrix given as GGUF blocks ``raw`` [n, row_bytes] of ``qtype``,
    repacked once here into the kernels' layout (``blocks``: groups of 8 rows with their blocks
    interleaved, see quant_matmul.c; ``raw`` is not kept) and checked once, so that each call costs
    little more than the C call.

    The activations (float32 [m, k]) are rounded to 16 bits per block of 32 (an error up to 2^-16 of a
    block's largest value); the products are summed exactly in integers and scaled in float32."""

    def __init__(self, raw: torch.Tensor, qtype: str):
        self.k, self.n, self.qtype = _check_raw(raw, qtype), raw.shape[0], qtype
        lib = build.load()
        self.blocks = torch.empty(lib.packed_bytes(QTYPE_IDS[qtype], self.n, self.k), dtype=torch.uint8)
        lib.repack_rows(raw.data_ptr(), QTYPE_IDS[qtype], self.n, self.k, self.blocks.data_ptr())
        self.args = (self.blocks.data_ptr(), QTYPE_IDS[qtype], self.n, self.k)
        self.fn = lib.qmatmul

    def __call__(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k or x.is_cuda:
            raise ValueError(f"expected float32 activations [m, {self.k}], got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.n)
        if x.shape[0] and self.n:
            rc = self.fn(
                *self.args, x.data_ptr(), x.shape[0], y.data_ptr(), threads or torch.get_num_threads()
            )
            if rc != 0:
                raise MemoryError(f"qmatmul could not allocate {x.shape[0]} x {self.k} quantised activations")
        return y

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), k]: rows ``ids`` of the matrix, dequantised (an embedding lookup)."""
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
            raise IndexError(f"row ids must lie in [0, {self.n}), got {int(ids.min())}..{int(ids.max())}")
        out = torch.empty(ids.numel(), self.k)
        build.load().dequant_rows(
            self.blocks.data_ptr(), QTYPE_IDS[self.qtype], self.k, ids.data_ptr(), ids.numel(), out.data_ptr()
        )
        return out

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def gguf_blocks(self) -> torch.Tensor:
        """The matrix back in GGUF's block layout, uint8 [n, row_bytes] (the inverse of the repacking)."""
        raw = torch.empty(self.n, self.k // 32 * BLOCK_BYTES[self.qtype], dtype=torch.uint8)
        lib = build.load()
        lib.unpack_rows(self.blocks.data_ptr(), QTYPE_IDS[self.qtype], self.n, self.k, raw.data_ptr())
        return raw


def qmatmul(raw: torch.Tensor, qtype: str, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """float32 ``x`` [m, k] @ W.T -> float32 [m, n], W the blocks ``raw`` [n, row_bytes] of ``qtype``
    (see ``QMatmul``)."""
    return QMatmul(raw, qtype)(x, threads)


def quantize_q8_0(w: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """float32 [n, k] -> uint8 [n, k / 32 * 34] Q8_0 blocks (see ``quantization.quantize_q8_0``)."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(
            f"expected a float32 [n, k] matrix with k a multiple of 32, got {w.dtype} {tuple(w.shape)}"
        )
    w = w.contiguous()
    out = torch.empty(w.shape[0], w.shape[1] // 32 * 34, dtype=torch.uint8)
    build.load().quantize_q8_0(
        w.data_ptr(), w.shape[0], w.shape[1], out.data_ptr(), threads or torch.get_num_threads()
    )
    return out


def _f32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.is_cuda:
            raise ValueError(f"expected contiguous float32 CPU tensors, got {t.dtype} {tuple(t.shape)}")


def kv_type_id(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The C kernels' id of the caches' one dtype (float32 or float16; contiguous CPU tensors)."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in KV_TYPE_IDS:
        raise ValueError(
            f"the C kernels read float32 or float16 KV caches of one dtype, got K {k_cache.dtype} and V "
            f"{v_cache.dtype}; allocate both as float32 or float16 (kv_cache_dtype)"
        )
    for t in (k_cache, v_cache):
        if not t.is_contiguous() or t.is_cuda:
            raise ValueError(f"expected contiguous CPU KV caches, got {tuple(t.shape)} on {t.device}")
    return KV_TYPE_IDS[k_cache.dtype]


def add_rms_norm(
    residual: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += add`` in place (``add`` may be None), then RMSNorm(residual) * weight, [n, d]."""
    _f32(residual, weight, *([] if add is None else [add]))
    if add is not None and add.shape != residual.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and addend {tuple(add.shape)} differ")
    n, d = residual.shape
    if weight.numel() != d:
        raise ValueError(f"the norm weight has {weight.numel()} elements, the rows {d}")
    out = torch.empty(n, d)
    ptr = None if add is None else add.data_ptr()
    build.load().add_rms_norm(residual.data_ptr(), ptr, weight.data_ptr(), eps, n, d, out.data_ptr())
    return out


def rope_(
    qkv: torch.Tensor, heads: int, head_dim: int, cos_sin: torch.Tensor, positions: torch.Tensor
) -> None:
    """Rotate-half rotary embedding in place on the first ``heads`` heads of each row of ``qkv`` [n, *];
    ``cos_sin`` [max_position, head_dim] holds ``[cos | sin]`` per position."""
    _f32(qkv, cos_sin)
    positions = positions.to(torch.int64).contiguous()
    if qkv.shape[1] < heads * head_dim or cos_sin.shape[1] != head_dim or positions.numel() != qkv.shape[0]:
        raise ValueError("rope_: qkv rows, heads * head_dim, cos_sin and positions do not fit together")
    if positions.numel() and int(positions.max()) >= cos_sin.shape[0]:
        raise IndexError(f"position {int(positions.max())} is past the rotary cache ({cos_sin.shape[0]})")
    build.load().rope(
        qkv.data_ptr(), qkv.shape[0], qkv.shape[1], heads, head_dim, cos_sin.data_ptr(), positions.data_ptr()
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2 * inter] -> [n, inter]: silu(gate) * up."""
    _f32(gate_up)
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(n, inter)
    build.load().silu_mul(gate_up.data_ptr(), n, inter, out.data_ptr())
    return out


def decode_attention(
    q: torch.Tensor,  # [n, >= heads * head_dim] float32: token s's query heads lead row s
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] float32 or float16
    v_cache: torch.Tensor,  # the same shape and dtype
    block_tables: torch.Tensor,  # [n, max_blocks] int32
    context_lens: torch.Tensor,  # [n] int32, each >= 1
    heads: int,
    scale: float,
    threads: int | None = None,
) -> torch.Tensor:  # [n, heads * head_dim]
    """One new token per sequence attending to its cached keys (its own already stored)."""
    if q.dtype != torch.float32 or q.dim() != 2 or q.stride(1) != 1:
        raise ValueError("decode_attention: q must be float32 [n, *] with unit column stride")
    kv_type = kv_type_id(k_cache, v_cache)
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    _, block_size, kv_heads, head_dim = k_cache.shape
    n = q.shape[0]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: K cache {tuple(k_cache.shape)}, V cache {tuple(v_cache.shape)}")
    if block_tables.shape[0] != n or context_lens.numel() != n or heads % kv_heads:
        raise ValueError("decode_attention: q, block_tables, context_lens and the heads do not fit together")
    if head_dim % 8 or head_dim > 512:
        raise ValueError(f"decode_attention needs head_dim a multiple of 8 (<= 512), got {head_dim}")
    out = torch.empty(n, heads * head_dim)
    rc = build.load().decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), kv_type, block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), n, heads, kv_heads, head_dim, block_size, scale,
        out.data_ptr(), threads or torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"decode_attention could not allocate scores for {int(context_lens.max())} keys")
    return out
