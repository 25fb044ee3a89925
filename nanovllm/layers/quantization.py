"""GGUF block-quantised weights kept packed in memory and multiplied by torch's CPU int4 kernel.

llama.cpp's block formats (32 weights a block, the scales stored as float16):

    Q4_0  [d: f16][qs: 16 bytes]           w[j] = d * (q[j] - 8)           18 bytes / 32 weights
    Q4_1  [d: f16][m: f16][qs: 16 bytes]   w[j] = d * q[j] + m             20 bytes / 32 weights
    Q8_0  [d: f16][qs: 32 x int8]          w[j] = d * q[j]                 34 bytes / 32 weights

In Q4_0/Q4_1, byte i of ``qs`` holds weight i in its low nibble and weight i + 16 in its high one.

torch's ``_weight_int4pack_mm_for_cpu`` computes ``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n]
+ zero[g, n]`` for groups ``g = k // 32``, so both 4-bit formats map onto it exactly (Q4_0: scale d, zero 0;
Q4_1: scale d, zero m + 8d). A Q8_0 matrix is split into two 4-bit halves of ``u = q + 128``: the high
nibble with scale 16d and zero 0, the low nibble with scale d and zero 8d; their sum is ``d * q``.

Measured on a 2-core AVX2 EPYC (benchmarks/bench_cpu_matmul.py): the int4 kernel is fast only with
bfloat16 activations (float32 ones take a slow scalar path, as do ``_weight_int8pack_mm`` and
``_dyn_quant_matmul_4bit``), so activations are cast to bfloat16 around it and the scales kept in bfloat16
(their float16 values lose 3 mantissa bits: a relative error of at most 2^-9).
"""

import torch
import torch.nn.functional as F

# ggml type name -> (weights per block, bytes per block)
PACKED_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}
GROUP = 32
_COMPUTE_DTYPE = torch.bfloat16


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one row of ``in_features`` weights in the block format ``qtype``."""
    block, nbytes = PACKED_TYPES[qtype]
    if in_features % block:
        raise ValueError(f"{qtype} rows need a multiple of {block} weights, got {in_features}")
    return in_features // block * nbytes


def _blocks(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """raw [rows, row_bytes] uint8 -> (block headers [rows, nb, h] uint8, quants [rows, nb, q] uint8)."""
    _, nbytes = PACKED_TYPES[qtype]
    head = 4 if qtype == "Q4_1" else 2
    b = raw.reshape(raw.shape[0], -1, nbytes)
    return b[..., :head], b[..., head:]


def _f16(header: torch.Tensor, i: int) -> torch.Tensor:
    """The i-th float16 of each block header, as float32: [rows, nb]."""
    return header[..., 2 * i : 2 * i + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[rows, nb, 16] uint8 -> [rows, nb, 32] uint8: low nibbles are weights 0-15, high ones 16-31."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def quants_scales_zeros(raw: torch.Tensor, qtype: str) -> list[Part]:
    """Decode raw blocks into 4-bit parts ``(q [rows, in] in 0..15, scale [rows, nb], zero [rows, nb])``
    whose sum of ``(q - 8) * scale + zero`` over parts is the weight (one part, two for Q8_0)."""
    header, qs = _blocks(raw, qtype)
    rows = raw.shape[0]
    d = _f16(header, 0)
    if qtype == "Q4_0":
        return [(_nibbles(qs).reshape(rows, -1), d, torch.zeros_like(d))]
    if qtype == "Q4_1":
        return [(_nibbles(qs).reshape(rows, -1), d, _f16(header, 1) + 8 * d)]
    u = (qs.view(torch.int8).to(torch.int16) + 128).to(torch.uint8).reshape(rows, -1)  # Q8_0: q + 128
    return [(u >> 4, 16 * d, torch.zeros_like(d)), (u & 15, d, 8 * d)]


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """raw [rows, row_bytes] uint8 -> float32 [rows, in_features], exactly as llama.cpp decodes it."""
    header, qs = _blocks(raw, qtype)
    rows, d = raw.shape[0], _f16(header, 0).unsqueeze(-1)
    if qtype == "Q8_0":
        w = qs.view(torch.int8).float() * d
    elif qtype == "Q4_0":
        w = (_nibbles(qs).float() - 8) * d
    else:
        w = _nibbles(qs).float() * d + _f16(header, 1).unsqueeze(-1)
    return w.reshape(rows, -1)


class PackedWeight:
    """One [out_features, in_features] matrix in torch's packed int4 layout; ``matmul(x)`` is ``x @ W.T``.

    Built from GGUF block bytes; shapes the kernel rejects fall back to a dense bfloat16 matrix.
    """

    def __init__(self, raw: torch.Tensor, qtype: str):
        self.qtype, self.shape = qtype, (raw.shape[0], raw.shape[1] // PACKED_TYPES[qtype][1] * GROUP)
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dense: torch.Tensor | None = None
        try:
            for q, scale, zero in quants_scales_zeros(raw, qtype):
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
                # [in / 32, out, 2]: the kernel's scale-and-zero layout
                sz = torch.stack([scale.t(), zero.t()], dim=-1).to(_COMPUTE_DTYPE).contiguous()
                self.parts.append((packed, sz))
        except RuntimeError:  # a shape the packed kernel does not take
            self.parts, self.dense = [], dequantize(raw, qtype).to(_COMPUTE_DTYPE)

    @property
    def nbytes(self) -> int:
        tensors = [t for part in self.parts for t in part] + ([self.dense] if self.dense is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features] in x's dtype."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).to(_COMPUTE_DTYPE)
        if self.dense is not None:
            y = F.linear(x, self.dense)
        else:
            y = None
            for packed, sz in self.parts:
                part = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
                y = part if y is None else y.add_(part)
        return y.to(dtype).reshape(*shape[:-1], self.shape[0])
