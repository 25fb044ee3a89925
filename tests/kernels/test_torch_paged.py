"""The torch backend's lean paged attention (kernels/torch_paged.py) against the plain reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.kernels import torch_paged
from nanovllm.kernels.reference import FP8_DTYPE, paged_prefill_attention_ref, store_kvcache_ref
from nanovllm.utils.context import Context
from tests.kernels.paged_kv import make_paged_kv

# Both sides compute in float32 and differ only in summation order (BLAS vs einsum, SDPA's blocked
# softmax); the output is then rounded to the query dtype, which dominates for bfloat16.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def step(context_lens, q_lens, block_tables, dtype, num_heads, head_dim, seed=0):
    """A step's Context and queries: sequence i has ``q_lens[i]`` new tokens ending at ``context_lens[i]``."""
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    bs_slots = torch.zeros(cu[-1], dtype=torch.int64)  # unused by attention; the store tests fill it
    ctx = Context(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        max_seqlen_q=max(q_lens),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        max_context_len=max(context_lens),
        block_tables=block_tables,
        slot_mapping=bs_slots,
    )
    return q, ctx


def check(context_lens, q_lens, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32,
          pad="poison", cache_dtype=None, kv_scales=(1.0, 1.0)):  # fmt: skip
    k_cache, v_cache, tables, lens = make_paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, cache_dtype or dtype, pad=pad, kv_scales=kv_scales
    )
    k_cache, v_cache, tables, lens = k_cache.cpu(), v_cache.cpu(), tables.cpu(), lens.cpu()
    q, ctx = step(context_lens, q_lens, tables, dtype, num_heads, head_dim, seed=len(q_lens))
    k_scale, v_scale = (torch.tensor([s]) for s in kv_scales)
    scale = head_dim**-0.5
    plan = torch_paged.StepPlan(ctx, block_size, num_kv_heads)
    out = torch_paged.paged_attention(q, k_cache, v_cache, plan, scale, k_scale, v_scale)
    ref = paged_prefill_attention_ref(
        q, k_cache, v_cache, ctx.cu_seqlens_q, lens, tables, scale, k_scale, v_scale
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("pad", ["poison", "-1", "0"])
def test_decode_batch_of_uneven_contexts(block_size, pad):
    check([1, 17, 300, 33, 256, 5], [1] * 6, block_size=block_size, pad=pad)


@pytest.mark.parametrize("block_size", [16, 256])
def test_prompt_chunks_with_and_without_cached_prefix(block_size):
    check([40, 300], [40, 7], block_size=block_size)  # a whole prompt; a chunk after 293 cached tokens


def test_mixed_step_decodes_around_prompt_chunks():
    # decode runs before, between and after two prompt chunks, as the scheduler may mix them
    check([20, 31, 64, 2, 90, 7, 130], [1, 1, 64, 1, 30, 1, 1])


@pytest.mark.parametrize("gqa", [(4, 4), (8, 2), (16, 1)])
def test_head_groupings(gqa):
    check([9, 50, 129], [1, 50, 3], num_heads=gqa[0], num_kv_heads=gqa[1], head_dim=32)


def test_bfloat16_queries_and_cache():
    check([33, 100, 7], [1, 20, 1], dtype=torch.bfloat16)


@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.05, 0.02)])
def test_fp8_cache(kv_scales):
    check([33, 100, 7], [1, 20, 1], cache_dtype=FP8_DTYPE, kv_scales=kv_scales)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 70), st.integers(0, 3)), min_size=1, max_size=6),
    st.sampled_from([8, 32]),
)
def test_random_mixes(seqs, block_size):
    """Any mix of decodes and chunks (q_len from 1 to the whole context) matches the reference."""
    context_lens = [n for n, _ in seqs]
    q_lens = [1 if kind < 2 else (n if kind == 2 else max(1, n // 2)) for n, kind in seqs]
    check(context_lens, q_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=block_size)


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8_DTYPE])
def test_store_skips_negative_slots_like_the_reference(cache_dtype):
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    slots = torch.tensor([5, -1, 0, 31, -1, 12])
    caches = [torch.zeros(4, 8, 2, 8).to(cache_dtype) for _ in range(4)]
    scales = torch.tensor([0.5]), torch.tensor([0.25])
    ctx = Context(
        cu_seqlens_q=torch.tensor([0, 6], dtype=torch.int32),
        context_lens=torch.tensor([6], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=slots,
    )
    plan = torch_paged.StepPlan(ctx, 8, 2)
    torch_paged.store_kvcache(key, value, caches[0], caches[1], plan, *scales)
    store_kvcache_ref(key, value, caches[2], caches[3], slots, *scales)
    assert torch.equal(caches[0].float(), caches[2].float()) and torch.equal(
        caches[1].float(), caches[3].float()
    )
    assert caches[0].float().abs().sum() > 0


def test_plan_is_shared_by_layers_and_rebuilt_for_a_new_step():
    q, ctx = step([5, 9], [1, 1], torch.tensor([[0], [1]], dtype=torch.int32), torch.float32, 2, 8)
    first = torch_paged.step_plan(ctx, 16, 1)
    assert torch_paged.step_plan(ctx, 16, 1) is first
    ctx.context_lens = ctx.context_lens + 1  # new tensors: a new step's data
    assert torch_paged.step_plan(ctx, 16, 1) is not first
    _, other = step([5, 9], [1, 1], ctx.block_tables, torch.float32, 2, 8)
    assert torch_paged.step_plan(other, 16, 1).key != torch_paged.step_plan(ctx, 16, 1).key
