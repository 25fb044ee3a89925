"""The one-call decode step (kernels/cpu/decode_step.c) against a plain-torch float32 forward of the same
dequantised weights, and its KV cache writes."""

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels.cpu import ops
from nanovllm.layers.quantization import dequantize

pytestmark = pytest.mark.skipif(not ops.available(), reason="the CPU C kernels did not build here")
gguf = pytest.importorskip("gguf")  # random_blocks' module needs it
from tests.kernels.test_cpu_layer_ops import paged_reference  # noqa: E402
from tests.kernels.test_cpu_quant_matmul import random_blocks  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 128, 4, 2, 32, 96
NUM_BLOCKS, BLOCK_SIZE, EPS = 24, 8, 1e-5


def make_layers(qtypes, seed, kv_dtype=torch.float32):
    from nanovllm.kernels.cpu.decode_step import LayerTensors

    g = torch.Generator().manual_seed(seed)
    shapes = {
        "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
        "o": (HIDDEN, HEADS * HEAD_DIM),
        "gate_up": (2 * INTER, HIDDEN),
        "down": (HIDDEN, INTER),
    }
    layers, dense = [], []
    for i, qtype in enumerate(qtypes):
        raws = {name: random_blocks(qtype, n, k, seed=seed + 7 * i + j) for j, (name, (n, k)) in
                enumerate(shapes.items())}  # fmt: skip
        mats = {name: ops.QMatmul(raw, qtype) for name, raw in raws.items()}
        norms = [torch.rand(HIDDEN, generator=g) + 0.5 for _ in range(2)]
        shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        caches = [torch.randn(shape, generator=g).to(kv_dtype) for _ in range(2)]
        dense.append({name: dequantize(raw, qtype) for name, raw in raws.items()})
        layers.append(LayerTensors(**mats, in_norm=norms[0], post_norm=norms[1], k_cache=caches[0],
                                   v_cache=caches[1]))  # fmt: skip
    return layers, dense


def rotate(t, heads, cos, sin):
    x1, x2 = t.view(t.shape[0], heads, HEAD_DIM).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference(layers, dense, x, cos_sin, positions, slots, tables, lens, final_norm, scale):
    """float32 torch: dequantised weights, caches copied and written by index (torch rounds to a float16
    cache's dtype to nearest even), read widened to float32."""
    m = x.shape[0]
    residual, caches = x.clone(), []
    for lt, w in zip(layers, dense, strict=True):
        k_cache, v_cache = lt.k_cache.clone(), lt.v_cache.clone()
        qkv = F.rms_norm(residual, (HIDDEN,), lt.in_norm, EPS) @ w["qkv"].T
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
        q, k, v = rotate(q, HEADS, cos, sin), rotate(k, KV_HEADS, cos, sin), v.view(m, KV_HEADS, HEAD_DIM)
        k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots] = k.to(k_cache.dtype)
        v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots] = v.to(v_cache.dtype)
        o = paged_reference(q, k_cache.float(), v_cache.float(), tables, lens, scale)
        residual = residual + o @ w["o"].T
        gate, up = (F.rms_norm(residual, (HIDDEN,), lt.post_norm, EPS) @ w["gate_up"].T).chunk(2, -1)
        residual = residual + (F.silu(gate) * up) @ w["down"].T
        caches.append((k_cache, v_cache))
    return F.rms_norm(residual, (HIDDEN,), final_norm, EPS), caches


def step_inputs(m):
    """cos_sin, shuffled block tables, lens, positions, slots, x, final_norm, scale of an m-sequence step."""
    g = torch.Generator().manual_seed(100 + m)
    half = HEAD_DIM // 2
    freqs = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(half).float() / half))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    tables = torch.randperm(NUM_BLOCKS, generator=g)[: m * 4].view(m, 4).int()  # shuffled blocks
    lens = torch.tensor([1, 17, 32, 9, 25][:m], dtype=torch.int32)
    positions = lens.long() - 1
    slots = tables[torch.arange(m), positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    x = torch.randn(m, HIDDEN, generator=g)
    final_norm = torch.rand(HIDDEN, generator=g) + 0.5
    scale = HEAD_DIM**-0.5
    return cos_sin, tables, lens, positions, slots, x, final_norm, scale


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_against_a_float32_torch_forward(m, threads, kv_dtype):
    from nanovllm.kernels.cpu.decode_step import DecodeStep

    layers, dense = make_layers(["Q4_1", "Q8_0", "Q4_0"], seed=m, kv_dtype=kv_dtype)
    cos_sin, tables, lens, positions, slots, x, final_norm, scale = step_inputs(m)
    expected, caches = reference(layers, dense, x, cos_sin, positions, slots, tables, lens, final_norm, scale)
    step = DecodeStep(layers, HEADS, KV_HEADS, HEAD_DIM, EPS, scale)
    residual = x.clone()
    got = step(residual, cos_sin, positions, slots, tables, lens, final_norm, threads=threads)
    # Activations rounded to 16 bits per block of 32 before each of 4 matmuls a layer (~2e-5 of a
    # matmul's output each), float32 sums in another order, a polynomial exp. A wrong rotary half, cache
    # slot, norm or silu block is off by > 10%.
    assert float((got - expected).norm() / expected.norm()) < 1e-3
    untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[slots] = False
    for lt, expected_caches in zip(layers, caches, strict=True):
        for got_cache, expected_cache in zip((lt.k_cache, lt.v_cache), expected_caches, strict=True):
            got_rows, expected_rows = (c.view(-1, KV_HEADS * HEAD_DIM) for c in (got_cache, expected_cache))
            assert torch.equal(got_rows[untouched], expected_rows[untouched])
            new, new_expected = got_rows[slots], expected_rows[slots]
            assert float((new.float() - new_expected.float()).norm() / new_expected.float().norm()) < 1e-3


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_float16_cache_against_the_float32_cache(threads):
    """The same step over a float16 cache and over a float32 cache holding the same (widened) values."""
    from nanovllm.kernels.cpu.decode_step import DecodeStep

    m = 5
    cos_sin, tables, lens, positions, slots, x, final_norm, scale = step_inputs(m)
    runs = {}
    for kv_dtype in (torch.float16, torch.float32):
        layers, _ = make_layers(["Q4_1", "Q8_0"], seed=3, kv_dtype=torch.float16)
        for lt in layers:
            lt.k_cache, lt.v_cache = lt.k_cache.to(kv_dtype), lt.v_cache.to(kv_dtype)
        step = DecodeStep(layers, HEADS, KV_HEADS, HEAD_DIM, EPS, scale)
        out = step(x.clone(), cos_sin, positions, slots, tables, lens, final_norm, threads=threads)
        runs[kv_dtype] = out, layers
    (out16, layers16), (out32, layers32) = runs[torch.float16], runs[torch.float32]
    # Layer 0's new K/V do not depend on the cache: the float32 run stored the kernel's floats as they
    # are, the float16 run must have stored them rounded to nearest even, as torch's .half() rounds
    # (a truncating conversion differs in about half the elements).
    for c16, c32 in ((layers16[0].k_cache, layers32[0].k_cache), (layers16[0].v_cache, layers32[0].v_cache)):
        rows16, rows32 = c16.view(-1, KV_HEADS * HEAD_DIM)[slots], c32.view(-1, KV_HEADS * HEAD_DIM)[slots]
        assert torch.equal(rows16, rows32.half())
    # Afterwards the halves' rounding (2^-11 of each cached element) reaches the outputs: loose.
    assert float((out16 - out32).norm() / out32.norm()) < 5e-3


def test_decode_step_rejects_shapes_it_cannot_take():
    from nanovllm.kernels.cpu.decode_step import DecodeStep

    layers, _ = make_layers(["Q4_1"], seed=0)
    with pytest.raises(ValueError, match="does not take"):
        DecodeStep(layers, HEADS * 2, KV_HEADS, HEAD_DIM // 2, EPS, 1.0)  # head_dim 16: not whole blocks
