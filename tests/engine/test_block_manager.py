import sys

from nanovllm.engine.block_manager import BlockManager, compute_block_hash
from tests.engine.factories import make_seq


def test_engine_core_imports_no_torch():
    import subprocess

    code = (
        "import sys; import nanovllm.engine.scheduler, nanovllm.engine.block_manager, "
        "nanovllm.engine.sequence, nanovllm.engine.step, nanovllm.engine.outputs, nanovllm; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hash_chains_on_prefix():
    a = compute_block_hash([1, 2, 3], -1)
    assert compute_block_hash([1, 2, 3], -1) == a
    assert compute_block_hash([4, 5, 6], a) != compute_block_hash([4, 5, 6], -1)


def admit(bm: BlockManager, seq, computed: bool = True) -> None:
    """Admit ``seq`` with its prefix hits and (if ``computed``) mark its whole prompt computed."""
    hits = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - len(hits) * bm.block_size, hits)
    if computed:
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_computed_blocks(seq)


def test_allocate_and_free_counts():
    bm = BlockManager(num_blocks=4, block_size=16)
    seq = make_seq(33)  # 3 blocks
    admit(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    bm.check_integrity([seq])
    assert not bm.allocate_slots(make_seq(40), 40)  # 3 more blocks do not fit: nothing changes
    assert bm.num_free_blocks == 1
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == [] and seq.num_computed_tokens == 0
    bm.check_integrity([])


def test_chunks_take_blocks_as_they_go():
    bm = BlockManager(num_blocks=8, block_size=16)
    seq = make_seq(100)
    assert bm.allocate_slots(seq, 20, [])
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 20
    bm.cache_computed_blocks(seq)
    assert len(bm.hash_to_block) == 1  # the second block is half computed: not findable
    assert bm.allocate_slots(seq, 30)
    assert len(seq.block_table) == 4


def test_prefix_hit_shares_blocks_and_leaves_last_token_uncached():
    bm = BlockManager(num_blocks=8, block_size=16)
    a, b = make_seq(40), make_seq(40)  # identical prompts: 2 full blocks + 8 tokens
    admit(bm, a)
    admit(bm, b, computed=False)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 32
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.check_integrity([a, b])
    # A prompt made only of full blocks still computes its last token: its last block is not a hit.
    c, d = make_seq(32), make_seq(32)
    bm2 = BlockManager(num_blocks=8, block_size=16)
    admit(bm2, c)
    admit(bm2, d, computed=False)
    assert d.num_computed_tokens == 16


def test_uncomputed_blocks_are_never_hit():
    bm = BlockManager(num_blocks=8, block_size=16)
    a = make_seq(40)
    admit(bm, a, computed=False)  # allocated, but its step never ran (or raised)
    b = make_seq(40)
    assert bm.get_computed_blocks(b) == []
    bm.free(a)
    assert bm.get_computed_blocks(b) == [] and not bm.hash_to_block


def test_freed_blocks_stay_findable_until_reused():
    bm = BlockManager(num_blocks=3, block_size=16)
    a = make_seq(33)
    admit(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    b = make_seq(33)
    hits = bm.get_computed_blocks(b)
    assert hits == first_two
    assert bm.allocate_slots(b, 1, hits)  # hits on free blocks still take them from the free list
    assert b.block_table[:2] == first_two and b.num_computed_tokens == 32 and bm.num_free_blocks == 0
    bm.check_integrity([b])


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = make_seq(20)
    admit(bm, a)
    # Forge a collision: make the table claim a's first block holds other tokens.
    bm.blocks[a.block_table[0]].token_ids = [99] * 16
    assert bm.get_computed_blocks(make_seq(20)) == []
