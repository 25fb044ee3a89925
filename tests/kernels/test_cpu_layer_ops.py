"""The fused CPU C layer ops (kernels/cpu/layer_ops.c) against plain torch."""

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels.cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="the CPU C kernels did not build here")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("n,d", [(1, 576), (5, 64), (3, 40)])
def test_add_rms_norm(with_add, n, d):
    residual = torch.randn(n, d, generator=gen(n)) * 3
    add = torch.randn(n, d, generator=gen(d)) if with_add else None
    weight = torch.rand(d, generator=gen(1)) + 0.5
    expected_residual = residual + add if with_add else residual.clone()
    expected = F.rms_norm(expected_residual, (d,), weight, 1e-5)
    out = ops.add_rms_norm(residual, add, weight, 1e-5)
    assert torch.equal(residual, expected_residual)  # the same float32 additions
    # float32 roundings in another order (the sum of squares is accumulated in double here)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rope_rotates_q_and_k_in_place_and_leaves_v():
    n, heads, kv_heads, head_dim = 4, 9, 3, 64
    half = head_dim // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, half).float() / half)
    freqs = torch.outer(torch.arange(100).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen(0))
    positions = torch.tensor([0, 7, 99, 7])
    x = qkv[:, : (heads + kv_heads) * head_dim].view(n, -1, head_dim)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
    x1, x2 = x.chunk(2, -1)
    expected_qk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(1)
    expected_v = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ops.rope_(qkv, heads + kv_heads, head_dim, cos_sin, positions)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * head_dim], expected_qk, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], expected_v)
    with pytest.raises(IndexError, match="past the rotary cache"):
        ops.rope_(qkv, heads + kv_heads, head_dim, cos_sin, torch.tensor([0, 1, 2, 100]))


def test_silu_mul_including_saturated_inputs():
    gate_up = torch.randn(3, 2 * 1539, generator=gen(2)) * 4  # 1539: an 8-wide loop and a scalar tail
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # exp clamped: silu -> 0 or x
    gate, up = gate_up.chunk(2, -1)
    expected = F.silu(gate) * up
    # the vector exp has a relative error below 1e-6
    torch.testing.assert_close(ops.silu_mul(gate_up), expected, rtol=2e-6, atol=1e-6)


def paged_reference(q, k_cache, v_cache, tables, lens, scale):
    """Gather each sequence's K/V in plain torch, softmax(q k^T * scale) v, query heads grouped."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = []
    for s, length in enumerate(lens.tolist()):
        pos = torch.arange(length)
        blocks = tables[s, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].repeat_interleave(heads // kv_heads, 1)  # [len, heads, d]
        v = v_cache[blocks, pos % block_size].repeat_interleave(heads // kv_heads, 1)
        p = torch.einsum("hd,lhd->hl", q[s], k).mul(scale).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(out).flatten(1)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_decode_attention_against_gathered_softmax(heads, kv_heads, head_dim):
    num_blocks, block_size, n = 40, 16, 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen(3))
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen(4))
    lens = torch.tensor([1, 17, 100, 16, 33], dtype=torch.int32)
    tables = torch.randperm(num_blocks, generator=gen(5))[: n * 8].view(n, 8).int()  # shuffled blocks
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen(6)) * 2
    scale = head_dim**-0.5
    got = ops.decode_attention(qkv, k_cache, v_cache, tables, lens, heads, scale)
    expected = paged_reference(
        qkv[:, : heads * head_dim].view(n, heads, head_dim), k_cache, v_cache, tables, lens, scale
    )
    # float32 sums in another order and a polynomial exp (relative error < 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(
        got, ops.decode_attention(qkv, k_cache, v_cache, tables, lens, heads, scale, threads=1)
    )


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 128)])
def test_decode_attention_reads_a_float16_cache(heads, kv_heads, head_dim):
    num_blocks, block_size, n = 40, 16, 5
    k32 = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen(13))
    v32 = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen(14))
    k16, v16 = k32.half(), v32.half()
    lens = torch.tensor([1, 17, 100, 16, 33], dtype=torch.int32)
    tables = torch.randperm(num_blocks, generator=gen(15))[: n * 8].view(n, 8).int()
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen(16)) * 2
    q, scale = qkv[:, : heads * head_dim].view(n, heads, head_dim), head_dim**-0.5
    got = ops.decode_attention(qkv, k16, v16, tables, lens, heads, scale)
    # the halves widened exactly: what is left is float32 sums in another order and the polynomial exp
    widened = paged_reference(q, k16.float(), v16.float(), tables, lens, scale)
    torch.testing.assert_close(got, widened, rtol=1e-5, atol=1e-5)
    # against the float32 cache the halves' rounding (2^-11 of each element) shows: loose, and far
    # below what reading halves as floats or a wrong element offset would give (~1)
    full = paged_reference(q, k32, v32, tables, lens, scale)
    assert float((got - full).norm() / full.norm()) < 3e-3


def test_decode_attention_rejects_mixed_or_unsupported_cache_dtypes():
    k = torch.zeros(2, 16, 1, 32)
    qkv, tables, lens = torch.zeros(1, 96), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1).int()
    with pytest.raises(ValueError, match="one dtype"):
        ops.decode_attention(qkv, k, k.half(), tables, lens, 1, 1.0)
    with pytest.raises(ValueError, match="float32 or float16"):
        ops.decode_attention(qkv, k.bfloat16(), k.bfloat16(), tables, lens, 1, 1.0)
