"""The flat decode kernel (kernels/decode_flat.py) against the float32 reference, and its host plan
against a plain walk over the tiles."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.paged_kv import device, make_paged_kv

pytest.importorskip("triton")

from nanovllm.kernels import decode_attention  # noqa: E402
from nanovllm.kernels.decode_flat import flat_decode_attention  # noqa: E402
from nanovllm.kernels.flat_plan import plan_flat_decode  # noqa: E402
from nanovllm.kernels.reference import FP8_DTYPE, paged_decode_attention_ref  # noqa: E402
from tests.kernels.test_decode_attention import TOLERANCE  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(
    lens=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    block_n=st.sampled_from([16, 64, 128]),
    programs=st.integers(1, 40),
    min_tiles=st.integers(1, 4),
)
def test_plan_covers_every_key_once(lens, block_n, programs, min_tiles):
    block_size = 2 * block_n
    table = 1000 * np.arange(len(lens))[:, None] + np.arange(-(-max(lens) // block_size) + 1)[None, :]
    plan = plan_flat_decode(lens, table, block_size, block_n, programs, min_tiles)
    tiles, bounds, pieces = plan.tiles, plan.bounds, plan.pieces
    # Every row's keys, tile by tile, in order; rows in order; each tile's block from the table.
    expect = [
        (r, key, n, 1000 * r + key // block_size) for r, n in enumerate(lens) for key in range(0, n, block_n)
    ]
    assert [tuple(int(x) for x in col) for col in tiles.T] == expect
    num_tiles = len(expect)
    assert len(bounds) == programs + 1 and bounds[0] == 0 and bounds[-1] == num_tiles
    sizes = np.diff(bounds)
    assert (sizes >= 0).all()
    used = sizes[sizes > 0]
    if num_tiles:  # as many equal ranges (to one tile) as allowed, none shorter than min_tiles unless all are
        assert len(used) == min(programs, max(1, num_tiles // min_tiles))
        assert used.max() - used.min() <= 1
        assert used.min() >= min(min_tiles, num_tiles)
        assert (sizes[len(used) :] == 0).all(), "the empty ranges come last"
    # Pieces, by walking each range: which programs hold a row's tiles, and the slot of the first.
    holders: dict[int, list[tuple[int, int]]] = {}
    for p in range(programs):
        rows_here = [int(tiles[0, t]) for t in range(bounds[p], bounds[p + 1])]
        for r in dict.fromkeys(rows_here):
            holders.setdefault(r, []).append((p, 0 if r == rows_here[0] else 1))
    for r, n in enumerate(lens):
        held = holders.get(r, [])
        assert pieces[1, r] == len(held)
        if held:
            p, slot = held[0]
            assert pieces[0, r] == 2 * p + slot
            assert [q for q, _ in held] == list(range(p, p + len(held))), "a row's programs are consecutive"
            assert all(slot == 0 for _, slot in held[1:]), "a later piece is its program's first row"
        else:
            assert n == 0


def check_flat(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, block_n, programs,
               cache_dtype=None, kv_scales=(1.0, 1.0), v_key_major=False, launch=None):  # fmt: skip
    """The flat kernel against the reference; rows without keys are left as they were."""
    cache = lambda **kw: make_paged_kv(
        lens, num_kv_heads, head_dim, block_size, cache_dtype or dtype, seed=len(lens), kv_scales=kv_scales,
        **kw,
    )  # fmt: skip
    k_cache, v_cache, block_tables, ctx = cache()
    v_read = cache(v_key_major=True)[1] if v_key_major else v_cache
    k_scale, v_scale = (torch.tensor([s], device=device()) for s in kv_scales)
    gen = torch.Generator().manual_seed(3)
    q_wide = torch.randn(len(lens), num_heads + 2, head_dim, generator=gen).to(dtype).to(device())
    q = q_wide[:, :num_heads]  # a view with a stride on dim 0, as the engine's
    plan = plan_flat_decode(lens, block_tables.cpu(), block_size, block_n, programs).to(device())
    out = torch.full(q.shape, 7.0, dtype=dtype, device=device())
    flat_decode_attention(q, k_cache, v_read, plan, 0.2, k_scale, v_scale, out=out, launch=launch)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, ctx, 0.2, k_scale, v_scale)
    ref[ctx == 0] = 7.0
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    counters = decode_attention._counters_for(torch.device(device()))
    assert int(counters.abs().sum()) == 0, "every merge leaves its counter at 0 for the next launch"
    return plan


# Lengths that cross tiles and blocks; with 16-key tiles and 1..64 programs, rows come whole in one
# range, cut in two, and cut over many programs (piece 0 in slot 1, later ones in slot 0).
LENS = [1, 15, 16, 17, 100, 300, 33, 64]


@pytest.mark.parametrize("programs", [1, 3, 8, 64])
@pytest.mark.parametrize("dtype,group", [(torch.float32, 2), (torch.float16, 1), (torch.float32, 4)])
def test_flat_decode(programs, dtype, group):
    plan = check_flat(LENS, 2 * group, 2, 32, 32, dtype, 16, programs)
    assert programs == 1 or plan.pieces[1].max() > 1  # some rows were cut


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 90), min_size=1, max_size=6),
    programs=st.integers(1, 24),
    fp8=st.booleans(),
)
def test_flat_decode_any_cut(lens, programs, fp8):
    """Any lengths cut over any number of programs (ranges that end on a row's last tile, start on
    its first, or fall inside it; more programs than tiles) give the reference's output."""
    check_flat(lens, 4, 2, 16, 16, torch.float32, 16, programs, FP8_DTYPE if fp8 else None, (0.1, 0.05), fp8)


@pytest.mark.parametrize("programs", [2, 13])
@pytest.mark.parametrize("v_key_major", [False, True])
@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.05, 0.02)])
def test_flat_decode_fp8(programs, v_key_major, kv_scales):
    """v_scale on each piece before the merge; key-major V read whole, its stale slots (448 here)
    weighted 0."""
    check_flat(LENS, 4, 2, 32, 32, torch.float32, 16, programs, FP8_DTYPE, kv_scales, v_key_major)


@pytest.mark.parametrize("programs", [1, 5])
def test_flat_decode_fp8_bf16_queries(programs):
    """bf16 queries with an fp8 cache, as the engine's: both go to fp16 for the dot, the scale after."""
    check_flat(LENS, 4, 2, 32, 32, torch.bfloat16, 16, programs, FP8_DTYPE, (0.05, 0.02), True)


def test_flat_decode_queries_past_fp16_range_stay_finite():
    """A bf16 query past fp16's largest value saturates on the way to fp16: the output is finite
    (an inf there would make the scores, and so the output, NaN)."""
    lens = [40, 17]
    k_cache, _, table, _ = make_paged_kv(lens, 2, 32, 16, FP8_DTYPE)
    v_cache = make_paged_kv(lens, 2, 32, 16, FP8_DTYPE, v_key_major=True)[1]
    q = torch.randn(2, 4, 32, device=device()).to(torch.bfloat16)
    q[0, 1, 3] = 1e6
    scale = torch.tensor([1.0], device=device())
    plan = plan_flat_decode(lens, table.cpu(), 16, 16, 3).to(device())
    out = flat_decode_attention(q, k_cache, v_cache, plan, 0.2, scale, scale)
    assert torch.isfinite(out.float()).all()


def test_flat_decode_rows_without_keys():
    """A row with no keys gets no tile: it is not written, and the rows beside it are right."""
    check_flat([0, 40, 0, 3, 0], 4, 2, 32, 16, torch.float32, 16, 3)


def test_flat_decode_checks_its_plan():
    lens = [5, 40]
    k_cache, v_cache, table, _ = make_paged_kv(lens, 2, 32, 16, torch.float32)
    q = torch.randn(2, 4, 32, device=device())
    table = table.cpu()
    with pytest.raises(AssertionError, match="inside blocks of 16"):
        plan_flat_decode(lens, table, 16, 32, 4)
    with pytest.raises(AssertionError, match="for 32-slot blocks"):
        flat_decode_attention(q, k_cache, v_cache, plan_flat_decode(lens, table, 32, 16, 4).to(device()), 0.2)
    with pytest.raises(AssertionError, match="FlatPlan.to"):
        flat_decode_attention(q, k_cache, v_cache, plan_flat_decode(lens, table, 16, 16, 4), 0.2)
    with pytest.raises(AssertionError, match="for 3 rows"):
        plan = plan_flat_decode(lens + [1], torch.cat([table, table[:1]]), 16, 16, 4).to(device())
        flat_decode_attention(q, k_cache, v_cache, plan, 0.2)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_flat_decode_gpu(cache_dtype, batch):
    """The engine's shapes: 256-slot blocks, 16/8 heads x 128, fp8 with key-major V and 128-key
    tiles, lengths uniform in 1..2048, the device's program count."""
    from nanovllm.kernels.flat_plan import device_programs

    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 2049, (batch,), generator=gen).tolist()
    fp8 = cache_dtype == FP8_DTYPE
    programs = device_programs(torch.device("cuda"), 8)
    check_flat(lens, 16, 8, 128, 256, torch.bfloat16, 128 if fp8 else 64, programs, cache_dtype,
               (0.05, 0.02) if fp8 else (1.0, 1.0), fp8)  # fmt: skip


@pytest.mark.gpu
def test_flat_decode_cuda_graph():
    """Captured once, replayed over other plans of the same program count written into the captured
    buffers (as an engine would), and other scales."""
    num_heads, num_kv_heads, head_dim, block_size, batch = 16, 8, 128, 256, 4
    k_cache, v_cache, table, ctx = make_paged_kv(
        [4096] * batch, num_kv_heads, head_dim, block_size, FP8_DTYPE, kv_scales=(0.05, 0.02),
        v_key_major=True,
    )  # fmt: skip
    k_scale, v_scale = torch.tensor([0.05], device="cuda"), torch.tensor([0.02], device="cuda")
    q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    host_table = table.cpu()
    plan = plan_flat_decode([4096] * batch, host_table, block_size, 128, 100).to("cuda")  # the most tiles
    run = lambda: flat_decode_attention(q, k_cache, v_cache, plan, 0.1, k_scale, v_scale)
    out = run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for i, lens in enumerate(([1, 2, 3, 4], [4096, 1, 255, 257], [1000, 2000, 3000, 4096])):
        new = plan_flat_decode(lens, host_table, block_size, 128, 100)
        plan.tiles[:, : new.tiles.shape[1]].copy_(torch.from_numpy(new.tiles))
        plan.bounds.copy_(torch.from_numpy(new.bounds))
        plan.pieces.copy_(torch.from_numpy(new.pieces))
        ctx.copy_(torch.tensor(lens, dtype=ctx.dtype))
        q.normal_()
        k_scale.fill_(0.05 * (i + 1))
        v_scale.fill_(0.02 / (i + 1))
        graph.replay()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, table, ctx, 0.1, k_scale, v_scale)
        torch.testing.assert_close(out, ref, **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_flat_decode_warns_when_the_programs_exceed_the_gpu(caplog):
    """More programs than the SMs hold at once run as a second wave: the launcher says so, once a
    compiled variant (2 stages here: a variant no other test builds)."""
    lens = [300] * 4
    k_cache, v_cache, table, _ = make_paged_kv(lens, 2, 32, 16, torch.float16)
    q = torch.randn(4, 4, 32, device="cuda", dtype=torch.float16)
    programs = 64 * torch.cuda.get_device_properties(0).multi_processor_count
    plan = plan_flat_decode(lens, table.cpu(), 16, 16, programs).to("cuda")
    with caplog.at_level("WARNING", logger="nanovllm"):
        flat_decode_attention(q, k_cache, v_cache, plan, 0.2, launch={"num_stages": 2})
    assert "second wave" in caplog.text
