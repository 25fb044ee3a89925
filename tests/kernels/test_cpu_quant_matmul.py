"""The CPU C kernels (kernels/cpu/) against plain references: gguf-py's block decoding and quantisation,
and ``dequantize()`` + a float32 matmul."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.kernels.cpu import ops
from nanovllm.layers.quantization import PACKED_TYPES, dequantize, quantize_q8_0

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e .[gguf])")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.available(), reason="the CPU C kernels did not build here")
QTYPES = sorted(PACKED_TYPES)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """uint8 [rows, row_bytes] of random blocks: float16 scales (and Q4_1 minimums), random quants."""
    rng = np.random.default_rng(seed)
    nb = rows * cols // 32
    d = rng.uniform(0.001, 0.05, (nb, 1)).astype(np.float16).view(np.uint8)
    body = rng.integers(0, 256, (nb, 32 if qtype == "Q8_0" else 16), dtype=np.uint8)
    if qtype == "Q4_1":
        m = rng.uniform(-0.4, 0.0, (nb, 1)).astype(np.float16).view(np.uint8)
        body = np.concatenate([m, body], axis=1)
    raw = np.concatenate([d, body], axis=1).reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(raw))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


# 70 rows: past one 64-row chunk of activations; 1, 3, 32: the 4-row tile and its remainders
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k", [(64, 96), (33, 576), (7, 32), (130, 1536)])
@pytest.mark.parametrize("m", [1, 3, 32, 70])
def test_qmatmul_against_dequantized_float_matmul(qtype, n, k, m):
    raw = random_blocks(qtype, n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = x @ dequantize(raw, qtype).T
    y = ops.qmatmul(raw, qtype, x)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # Activations rounded to 16 bits per block of 32 (an error up to max|x| / 65534 per element, random
    # in sign; measured ~2e-5 of the output's norm) and float32 sums in another order. A wrong scale, a
    # swapped nibble, a lost minimum or a misplaced row is off by > 20%.
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("qtype", QTYPES)
def test_qmatmul_output_does_not_depend_on_the_thread_count(qtype):
    # each output is one thread's sum in a fixed order, so the split of rows cannot change a bit
    raw, x = random_blocks(qtype, 97, 192), torch.randn(5, 192)
    assert torch.equal(ops.qmatmul(raw, qtype, x, threads=1), ops.qmatmul(raw, qtype, x, threads=2))


@settings(max_examples=25, deadline=None)
@given(
    qtype=st.sampled_from(QTYPES),
    n=st.integers(1, 40),
    blocks=st.integers(1, 6),
    m=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_qmatmul_any_shape(qtype, n, blocks, m, seed):
    raw = random_blocks(qtype, n, 32 * blocks, seed)
    x = torch.randn(m, 32 * blocks, generator=torch.Generator().manual_seed(seed))
    w = dequantize(raw, qtype)
    err = (ops.qmatmul(raw, qtype, x) - x @ w.T).norm()
    # Relative to the terms' size, not the output's: a single output can cancel to ~1% of its terms
    # (seed 210: -0.127 from terms summing to 11.6 in magnitude), where the 16-bit activations' error is
    # 3e-4 of it. A misread block errs by a good fraction of the terms.
    assert err < 1e-4 * (x.abs() @ w.abs().T).norm()


@pytest.mark.parametrize("qtype", QTYPES)
def test_corrupted_blocks_fail_the_bound(qtype):
    """The bound above is tight enough to catch a misread block: swapped nibbles, a doubled scale."""
    raw, x = random_blocks(qtype, 64, 256, seed=3), torch.randn(4, 256)
    ref = x @ dequantize(raw, qtype).T
    bad = raw.clone()
    head = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[qtype]
    blocks = bad.view(-1, PACKED_TYPES[qtype][1])
    if qtype == "Q8_0":
        blocks[:, head:] = blocks[:, head:].flip(-1)  # weights in the wrong order
    else:
        qs = blocks[:, head:]
        blocks[:, head:] = (qs << 4) | (qs >> 4)
    assert rel_err(ops.qmatmul(bad, qtype, x), ref) > 0.2
    bad = raw.clone()
    d = bad.view(-1, PACKED_TYPES[qtype][1])[:, :2].clone().view(torch.float16)
    bad.view(-1, PACKED_TYPES[qtype][1])[:, :2] = (d * 2).view(torch.uint8)
    assert rel_err(ops.qmatmul(bad, qtype, x), ref) > 0.2


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequant_rows_equal_gguf_py(qtype):
    raw = random_blocks(qtype, 50, 96, seed=7)
    full = torch.from_numpy(gguf_dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype]).reshape(50, 96))
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(ops.QMatmul(raw, qtype).rows(ids), full[ids].float())
    with pytest.raises(IndexError, match="row ids must lie in"):
        ops.QMatmul(raw, qtype).rows(torch.tensor([50]))


def test_quantize_q8_0_recovers_gguf_py_blocks_bit_for_bit():
    # gguf-py quantises as llama.cpp does; decoding and quantising again must give the same bytes
    # (the lean forward rebuilds the tied Q8_0 embedding this way from its float32 decoding)
    w = np.random.default_rng(0).standard_normal((40, 320)).astype(np.float32)
    w[3, :32] = 0  # an all-zero block: d = 0
    blocks = gguf_quantize(w, gguf.GGMLQuantizationType.Q8_0)
    decoded = dequantize(torch.from_numpy(blocks), "Q8_0")
    assert torch.equal(quantize_q8_0(decoded), torch.from_numpy(blocks))
    assert torch.equal(ops.quantize_q8_0(torch.from_numpy(w)), torch.from_numpy(blocks))


def test_bad_arguments_name_the_problem():
    raw = random_blocks("Q4_1", 8, 64)
    with pytest.raises(ValueError, match=r"float32 activations \[m, 64\]"):
        ops.qmatmul(raw, "Q4_1", torch.randn(2, 32))
    with pytest.raises(ValueError, match="contiguous uint8"):
        ops.qmatmul(raw.float(), "Q4_1", torch.randn(2, 64))
    with pytest.raises(ValueError, match="whole 20-byte blocks"):
        ops.qmatmul(raw[:, :30].contiguous(), "Q4_1", torch.randn(2, 64))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("k", [32, 576, 1536])
def test_repacked_blocks_give_back_the_gguf_bytes(qtype, k):
    raw = random_blocks(qtype, 5, k, seed=k)
    assert torch.equal(ops.QMatmul(raw, qtype).gguf_blocks(), raw)
