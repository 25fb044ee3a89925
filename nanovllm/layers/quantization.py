"""GGUF block-quantised weights kept packed in memory: our C kernels where they build, else torch's.

llama.cpp's block formats (32 weights a block, the scales stored as float16):

    Q4_0  [d: f16][qs: 16 bytes]           w[j] = d * (q[j] - 8)           18 bytes / 32 weights
    Q4_1  [d: f16][m: f16][qs: 16 bytes]   w[j] = d * q[j] + m             20 bytes / 32 weights
    Q8_0  [d: f16][qs: 32 x int8]          w[j] = d * q[j]                 34 bytes / 32 weights

In Q4_0/Q4_1, byte i of ``qs`` holds weight i in its low nibble and weight i + 16 in its high one.

With the C kernels (kernels/cpu/, AVX2): the block bytes are kept, regrouped eight rows at a time with
their blocks interleaved (``ops.QMatmul``), and a matmul quantises its float32 activations to 16 bits
per block of 32 and sums integer products (``ACT_DTYPE`` float32, output float32).

Without them (no compiler, another CPU): torch's ``_weight_int4pack_mm_for_cpu`` computes ``x @ W.T``
with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`` for groups ``g = k // 32``, so both 4-bit
formats map onto it exactly (Q4_0: scale d, zero 0; Q4_1: scale d, zero m + 8d). A Q8_0 matrix is split
into two 4-bit halves of ``u = q + 128``: the high nibble with scale 16d and zero 0, the low nibble with
scale d and zero 8d; their sum is ``d * q``. That kernel is fast only with bfloat16 activations (float32
ones take a slow scalar path), so ``ACT_DTYPE`` is then bfloat16 and the scales are kept in bfloat16
(their float16 values lose 3 mantissa bits: a relative error of at most 2^-9).
"""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from nanovllm.kernels.cpu import ops

GROUP = 32
# ggml type name -> (weights per block, bytes per block); the byte counts are the C kernels' table
PACKED_TYPES = {qtype: (GROUP, nbytes) for qtype, nbytes in ops.BLOCK_BYTES.items()}
_COMPUTE_DTYPE = torch.bfloat16  # the torch fallback's activations
_BLOCK_DTYPES = {
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
}


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one row of ``in_features`` weights in the block format ``qtype``."""
    block, nbytes = PACKED_TYPES[qtype]
    if in_features % block:
        raise ValueError(f"{qtype} rows need a multiple of {block} weights, got {in_features}")
    return in_features // block * nbytes


def _blocks(raw: torch.Tensor, qtype: str) -> np.ndarray:
    """raw uint8 [rows, row_bytes] -> a structured numpy view [rows, blocks] with fields d (m) qs."""
    return np.ascontiguousarray(raw.numpy()).view(_BLOCK_DTYPES[qtype])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[rows, nb, 16] uint8 -> [rows, nb * 32]: low nibbles are weights 0-15 of a block, high ones 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


Part = tuple[np.ndarray, np.ndarray, np.ndarray]


def quants_scales_zeros(raw: torch.Tensor, qtype: str) -> list[Part]:
    """Decode raw blocks into 4-bit parts ``(q [rows, in] in 0..15, scale [rows, nb], zero [rows, nb])``
    whose sum of ``(q - 8) * scale + zero`` over parts is the weight (one part, two for Q8_0)."""
    b = _blocks(raw, qtype)
    d = b["d"].astype(np.float32)
    if qtype == "Q4_0":
        return [(_nibbles(b["qs"]), d, np.zeros_like(d))]
    if qtype == "Q4_1":
        return [(_nibbles(b["qs"]), d, b["m"].astype(np.float32) + 8 * d)]
    u = (b["qs"].view(np.uint8) ^ 0x80).reshape(raw.shape[0], -1)  # Q8_0: q + 128 (flip the sign bit)
    return [(u >> 4, 16 * d, np.zeros_like(d)), (u & 15, d, 8 * d)]


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """raw [rows, row_bytes] uint8 -> float32 [rows, in_features], exactly as llama.cpp decodes it."""
    b = _blocks(raw, qtype)
    d = b["d"].astype(np.float32)[..., None]
    if qtype == "Q8_0":
        w = b["qs"] * d
    elif qtype == "Q4_0":
        w = (_nibbles(b["qs"]).reshape(*d.shape[:2], 32).astype(np.float32) - 8) * d
    else:
        w = _nibbles(b["qs"]).reshape(*d.shape[:2], 32) * d + b["m"].astype(np.float32)[..., None]
    return torch.from_numpy(w.astype(np.float32).reshape(raw.shape[0], -1))


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float32 [n, k] -> uint8 Q8_0 blocks [n, k / 32 * 34] as llama.cpp quantises (d = max|w| / 127 in
    float16, q = w / d rounded half away from zero); a matrix decoded from Q8_0 comes back bit for bit."""
    if ops.available():
        return ops.quantize_q8_0(w.float())
    x = w.float().numpy().reshape(w.shape[0], -1, 32)
    d = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    v = x * np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    out = np.empty((*x.shape[:2],), dtype=_BLOCK_DTYPES["Q8_0"])
    out["d"], out["qs"] = d[..., 0].astype(np.float16), q
    return torch.from_numpy(out.view(np.uint8).reshape(w.shape[0], -1))


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """[n, k] values 0..15 -> [n, k / 2] uint8 in the CPU kernel's layout: per block of 32 rows, a [k, 16]
    byte array whose byte (k, i) holds row i in its low nibble and row 16 + i in its high one."""
    n, k = q.shape
    q = q.astype(np.uint8).reshape(n // 32, 2, 16, k)
    return (q[:, 0] | (q[:, 1] << 4)).transpose(0, 2, 1).reshape(n, k // 2)


@lru_cache(maxsize=1)
def _layout_known() -> bool:
    """True when ``_pack_int4`` reproduces this torch's own packing (checked once on a random matrix)."""
    q = np.random.default_rng(0).integers(0, 16, (64, 128), dtype=np.int32)
    ours = torch.from_numpy(np.ascontiguousarray(_pack_int4(q)))
    return torch.equal(ours, torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), 2))


def pack_int4(q: np.ndarray) -> torch.Tensor:
    """[n, k] values 0..15 -> the packed weight of ``_weight_int4pack_mm_for_cpu``."""
    if q.shape[0] % 32 == 0 and _layout_known():
        return torch.from_numpy(np.ascontiguousarray(_pack_int4(q)))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 2)


def _bfloat16(x: np.ndarray) -> torch.Tensor:
    """float32 numpy -> contiguous bfloat16 tensor, rounded to nearest even (numpy has no bfloat16;
    torch's strided conversion is ~10x slower than this on the scales' transposed layout)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return torch.from_numpy(u.astype(np.uint16)).view(torch.bfloat16)


def act_dtype() -> torch.dtype:
    """The activations' dtype ``PackedWeight.mm`` takes and returns: float32 with the C kernels."""
    return torch.float32 if ops.available() else _COMPUTE_DTYPE


class PackedWeight:
    """One [out_features, in_features] matrix kept quantised; ``matmul(x)`` is ``x @ W.T``.

    Built from GGUF block bytes: kept raw for the C kernels, else repacked for torch's int4 kernel
    (shapes that one rejects fall back to a dense bfloat16 matrix).
    """

    def __init__(self, raw: torch.Tensor, qtype: str):
        self.qtype, self.shape = qtype, (raw.shape[0], raw.shape[1] // PACKED_TYPES[qtype][1] * GROUP)
        self.qmatmul: ops.QMatmul | None = None  # the C kernels' repacked copy (the raw bytes are dropped)
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dense: torch.Tensor | None = None
        if ops.available():
            self.qmatmul = ops.QMatmul(raw.contiguous(), qtype)
            return
        try:
            for q, scale, zero in quants_scales_zeros(raw, qtype):
                # [in / 32, out, 2]: the kernel's scale-and-zero layout
                sz = _bfloat16(np.stack([scale.T, zero.T], axis=-1))
                self.parts.append((pack_int4(q), sz))
        except RuntimeError:  # a shape the packed kernel does not take
            self.parts, self.dense = [], dequantize(raw, qtype).to(_COMPUTE_DTYPE)

    @property
    def raw(self) -> torch.Tensor | None:
        """The GGUF blocks uint8 [out, row_bytes] (rebuilt from the C kernels' layout; None without them)."""
        return None if self.qmatmul is None else self.qmatmul.gguf_blocks()

    @property
    def nbytes(self) -> int:
        tensors = [t for part in self.parts for t in part]
        tensors += [t for t in (self.dense, self.qmatmul and self.qmatmul.blocks) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features] in x's dtype."""
        shape, dtype = x.shape, x.dtype
        y = self.mm(x.reshape(-1, shape[-1]).to(act_dtype()))
        return y.to(dtype).reshape(*shape[:-1], self.shape[0])

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """``act_dtype()`` [m, in_features] -> the same dtype [m, out_features], no casts (the lean
        CPU forward's call)."""
        if self.qmatmul is not None:
            return self.qmatmul(x)
        if self.dense is not None:
            return F.linear(x, self.dense)
        y = None
        for packed, sz in self.parts:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
            y = part if y is None else y.add_(part)
        return y

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), in_features]: rows ``ids`` of the matrix (an embedding lookup)."""
        if self.qmatmul is not None:
            return self.qmatmul.rows(ids)
        raise NotImplementedError("row lookups need the C kernels")
