"""Packed GGUF weights (layers/quantization.py) against gguf-py's own block decoding."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e .[gguf])")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from nanovllm.layers.quantization import (  # noqa: E402
    PACKED_TYPES,
    PackedWeight,
    _layout_known,
    _pack_int4,
    dequantize,
    pack_int4,
    row_bytes,
)

Q = gguf.GGMLQuantizationType


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, row_bytes] of random blocks: float16 scales (and Q4_1 minimums), random quants."""
    rng = np.random.default_rng(seed)
    nb = rows * cols // 32
    d = rng.uniform(0.001, 0.05, (nb, 1)).astype(np.float16).view(np.uint8)
    if qtype == "Q8_0":
        body = rng.integers(0, 256, (nb, 32), dtype=np.uint8)
    else:
        body = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    if qtype == "Q4_1":
        m = rng.uniform(-0.4, 0.0, (nb, 1)).astype(np.float16).view(np.uint8)
        body = np.concatenate([m, body], axis=1)
    return np.concatenate([d, body], axis=1).reshape(rows, row_bytes(qtype, cols))


@pytest.mark.parametrize("qtype", sorted(PACKED_TYPES))
def test_dequantize_equals_gguf_py(qtype):
    raw = random_blocks(qtype, 8, 128)
    expected = gguf_dequantize(raw, Q[qtype]).astype(np.float32).reshape(8, 128)
    assert torch.equal(dequantize(torch.from_numpy(raw), qtype), torch.from_numpy(expected))


# out_features 48 is not a multiple of 32: torch's own packing op takes over from ours
@pytest.mark.parametrize("rows,cols", [(64, 96), (48, 64), (256, 576)])
@pytest.mark.parametrize("qtype", sorted(PACKED_TYPES))
@pytest.mark.parametrize("batch", [1, 5])
def test_packed_matmul_against_gguf_py(qtype, rows, cols, batch):
    raw = random_blocks(qtype, rows, cols, seed=rows + cols)
    w = torch.from_numpy(gguf_dequantize(raw, Q[qtype]).astype(np.float32).reshape(rows, cols))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    packed = PackedWeight(torch.from_numpy(raw), qtype)
    assert packed.dense is None  # the packed kernel, not the fallback
    y = packed.matmul(x)
    assert y.dtype == torch.float32 and y.shape == (batch, rows)
    # bfloat16 activations, scales and output: each a relative rounding of at most 2^-9, so 2% of the
    # output's norm bounds the error; a wrong scale, a swapped nibble or a lost minimum is off by > 20%.
    ref = x @ w.T
    assert (y - ref).norm() <= 0.02 * ref.norm()
    swapped = torch.from_numpy(raw.copy())
    if qtype != "Q8_0":  # the same bytes with each quant byte's nibbles swapped must not pass
        head = 2 if qtype == "Q4_0" else 4
        blocks = swapped.view(-1, PACKED_TYPES[qtype][1])
        qs = blocks[:, head:]
        blocks[:, head:] = (qs << 4) | (qs >> 4)
        assert (PackedWeight(swapped, qtype).matmul(x) - ref).norm() > 0.2 * ref.norm()


@pytest.mark.parametrize("shape", [(32, 32), (64, 128), (96, 576), (1536, 64)])
def test_int4_layout_equals_torch_packing(shape):
    """pack_int4 gives torch's own packing on every CPU; the fast numpy layout is used only where it is
    that packing (torch packs differently on AVX-512 CPUs, and _layout_known() then says no)."""
    q = np.random.default_rng(0).integers(0, 16, shape, dtype=np.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), 2)
    assert torch.equal(pack_int4(q), theirs)
    ours = torch.from_numpy(np.ascontiguousarray(_pack_int4(q)))
    assert torch.equal(ours, theirs) == _layout_known()


def test_row_bytes_rejects_partial_blocks():
    assert row_bytes("Q4_1", 64) == 40
    with pytest.raises(ValueError, match="multiple of 32"):
        row_bytes("Q8_0", 48)
