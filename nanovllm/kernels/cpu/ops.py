"""Python entry points of the CPU C kernels: torch tensors in, torch tensors out.

Each function checks what the C side assumes (dtype, contiguity, shapes) and passes data pointers; the
library comes from ``build.load()``. Callers check ``available()`` first and keep a torch path.
"""

import torch

from nanovllm.kernels.cpu import build

QTYPE_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
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


def qmatmul(raw: torch.Tensor, qtype: str, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """float32 ``x`` [m, k] @ W.T -> float32 [m, n], W the blocks ``raw`` [n, row_bytes] of ``qtype``.

    The activations are rounded to 16 bits per block of 32 (an error up to 2^-16 of a block's largest
    value); the products are summed exactly in integers and scaled in float32."""
    k = _check_raw(raw, qtype)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"expected float32 activations [m, {k}], got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    m, n = x.shape[0], raw.shape[0]
    y = torch.empty(m, n)
    if m == 0 or n == 0:
        return y
    threads = threads or torch.get_num_threads()
    rc = build.load().qmatmul(raw.data_ptr(), QTYPE_IDS[qtype], n, k, x.data_ptr(), m, y.data_ptr(), threads)
    if rc != 0:
        raise MemoryError(f"qmatmul could not allocate {m} x {k} quantised activations")
    return y


def dequant_rows(raw: torch.Tensor, qtype: str, ids: torch.Tensor) -> torch.Tensor:
    """float32 [len(ids), k]: rows ``ids`` of the quantised matrix ``raw`` (an embedding lookup)."""
    k = _check_raw(raw, qtype)
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= raw.shape[0]):
        raise IndexError(f"row ids must lie in [0, {raw.shape[0]}), got {int(ids.min())}..{int(ids.max())}")
    out = torch.empty(ids.numel(), k)
    build.load().dequant_rows(
        raw.data_ptr(), QTYPE_IDS[qtype], k, ids.data_ptr(), ids.numel(), out.data_ptr()
    )
    return out


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
