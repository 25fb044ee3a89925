import sys

import pytest

from nanovllm.engine.block_manager import BlockManager, compute_block_hash
from tests.engine.factories import make_seq


def test_engine_core_imports_no_torch():
    import subprocess

    code = (
        "import sys; import nanovllm.engine.scheduler, nanovllm.engine.block_manager, "
        "nanovllm.engine.sequence, nanovllm; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hash_chains_on_prefix():
    a = compute_block_hash([1, 2, 3], -1)
    assert compute_block_hash([1, 2, 3], -1) == a
    assert compute_block_hash([4, 5, 6], a) != compute_block_hash([4, 5, 6], -1)


def test_allocate_and_free_counts():
    bm = BlockManager(num_blocks=4, block_size=16)
    seq = make_seq(33)  # 3 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    bm.check_integrity([seq])
    bm.deallocate(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == [] and seq.num_cached_tokens == 0
    bm.check_integrity([])


def test_prefix_hit_shares_blocks_and_leaves_last_token_uncached():
    bm = BlockManager(num_blocks=8, block_size=16)
    a, b = make_seq(40), make_seq(40)  # identical prompts: 2 full blocks + 8 tokens
    bm.allocate(a)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 32
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.check_integrity([a, b])
    # A prompt made only of full blocks still computes its last token: its last block is not a hit.
    c, d = make_seq(32), make_seq(32)
    bm2 = BlockManager(num_blocks=8, block_size=16)
    bm2.allocate(c)
    bm2.allocate(d)
    assert d.num_cached_tokens == 16 and d.num_cached_tokens < d.num_tokens


def test_freed_blocks_stay_findable_until_reused():
    bm = BlockManager(num_blocks=3, block_size=16)
    a = make_seq(33)
    bm.allocate(a)
    first_two = a.block_table[:2]
    bm.deallocate(a)
    b = make_seq(33)
    assert bm.lookup(b) == (32, 3)  # hits on free blocks still take them from the free list
    bm.allocate(b)
    assert b.block_table[:2] == first_two and b.num_cached_tokens == 32
    bm.check_integrity([b])


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = make_seq(20)
    bm.allocate(a)
    # Forge a collision: make the table claim a's first block holds other tokens.
    bm.blocks[a.block_table[0]].token_ids = [99] * 16
    b = make_seq(20)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


@pytest.mark.parametrize("block_size", [16, 32])
def test_can_append_at_block_boundaries(block_size):
    bm = BlockManager(num_blocks=2, block_size=block_size)
    seq = make_seq(block_size, block_size=block_size)  # exactly one full block
    bm.allocate(seq)
    assert len(seq.block_table) == 1
    seq.append_token(5)  # token block_size+1 needs a second block
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 0
    for _ in range(block_size - 1):  # fill the second block: no new block needed
        seq.append_token(5)
        assert bm.can_append(seq)
        bm.may_append(seq)
    assert len(seq.block_table) == 2
    seq.append_token(5)  # starts a third block: none free
    assert not bm.can_append(seq)
    bm.check_integrity([seq])
