"""Paged KV-cache bookkeeping with prefix caching. Pure Python: no torch.

The KV cache is cut into ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns a
``block_table``: the ids of the blocks that hold its tokens, in order.

Prefix caching. A *full* block is identified by a chained hash::

    hash(block i) = xxh64( hash(block i-1) as 8 bytes  ||  the block's token ids as uint32 )

so equal hashes mean equal token prefixes, not just equal blocks (the chain starts from -1 for
block 0). ``hash_to_block`` maps these hashes to blocks whose K/V are (or, within the step being
scheduled, will be) computed. A hit is double-checked by comparing token ids, so a hash collision
can cost a cache miss, never a wrong answer.

Lifecycle of a block::

    free (ref_count 0, maybe still hashed) --allocate/hit--> used (ref_count = number of sequences)
    used --last user frees it--> free again, appended to the back of the free queue

Free blocks keep their hash until they are handed out for other content, so a prefix freed
recently can still be hit; reuse takes the least recently freed block first (LRU).

At most ``num_tokens - 1`` prompt tokens are served from the cache: the last token is always
computed, because its logits choose the next token.
"""

from array import array

import xxhash

from nanovllm.engine.sequence import Sequence


def compute_block_hash(token_ids: list[int], prev_hash: int) -> int:
    h = xxhash.xxh64()
    h.update((prev_hash & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
    h.update(array("I", token_ids).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1  # -1 = not a cached full block
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # Insertion-ordered set of free block ids: the front is the least recently freed.
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    # ---- prefix-cache lookup -------------------------------------------------------------

    def _full_block_hashes(self, seq: Sequence, limit_tokens: int) -> list[int]:
        """Chained hashes of the blocks of ``seq`` that are full within its first ``limit_tokens``."""
        hashes, h = [], -1
        for i in range(limit_tokens // self.block_size):
            h = compute_block_hash(seq.block(i), h)
            hashes.append(h)
        return hashes

    def _cached_blocks(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(hashes of all full prompt blocks, ids of the leading blocks that hit the cache)."""
        hashes = self._full_block_hashes(seq, seq.num_tokens)
        max_hits = (seq.num_tokens - 1) // self.block_size  # the last token is always computed
        hits = []
        for i, h in enumerate(hashes[:max_hits]):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != seq.block(i):
                break
            hits.append(block_id)
        return hashes, hits

    # ---- admission (prefill) -------------------------------------------------------------

    def lookup(self, seq: Sequence) -> tuple[int, int]:
        """(prompt tokens a new admission would serve from the cache, free blocks it would take).

        Hits on free blocks take them out of the free list, so they count as taken too."""
        _, hits = self._cached_blocks(seq)
        hits_on_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return len(hits) * self.block_size, seq.num_blocks - len(hits) + hits_on_free

    def can_allocate(self, seq: Sequence) -> bool:
        return self.lookup(seq)[1] <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` a block table for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, "sequence already holds blocks"
        hashes, hits = self._cached_blocks(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = len(hits) * self.block_size
        for i in range(len(hits), seq.num_blocks):
            block = self._take_free_block()
            seq.block_table.append(block.block_id)
            if i < len(hashes):
                self._set_hash(block, hashes[i], seq.block(i))

    def _take_free_block(self) -> Block:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        return block

    def _set_hash(self, block: Block, h: int, token_ids: list[int]) -> None:
        # A newer block with the same content takes over the hash; the older one keeps its own
        # hash for chaining and loses it when reused (see _take_free_block).
        block.hash, block.token_ids = h, list(token_ids)
        self.hash_to_block[h] = block.block_id

    def deallocate(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finish or preemption). Its cache state is reset."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    # ---- decode ----------------------------------------------------------------------------

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token about to be computed for ``seq`` has a slot (maybe a new block)."""
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        """Before a decode step: give ``seq`` a new block if its newest token starts one."""
        if len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block().block_id)

    def hash_full_blocks(self, seq: Sequence) -> None:
        """After a step: register the blocks that became full (their K/V are now computed).

        The cached prefix of a sequence is always hashed by ``allocate``; here we hash the block
        that the last computed token completed, chaining from the block before it.
        """
        computed = seq.num_tokens - 1  # K/V exist for every token but the newest one
        i = computed // self.block_size - 1
        if computed % self.block_size or i < 0 or i >= len(seq.block_table):
            return
        block = self.blocks[seq.block_table[i]]
        if block.hash != -1:
            return
        prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
        self._set_hash(block, compute_block_hash(seq.block(i), prev), seq.block(i))

    # ---- invariants (tests call this after every step) ------------------------------------

    def check_integrity(self, seqs: list[Sequence]) -> None:
        users: dict[int, int] = {}
        for seq in seqs:
            for block_id in seq.block_table:
                users[block_id] = users.get(block_id, 0) + 1
        for block in self.blocks:
            assert block.ref_count == users.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count} != users {users.get(block.block_id, 0)}"
            )
            is_free = block.block_id in self.free_block_ids
            assert (block.ref_count == 0) == is_free, (
                f"block {block.block_id}: ref_count {block.ref_count} but free={is_free}"
            )
        used = sum(1 for b in self.blocks if b.ref_count > 0)
        assert used + self.num_free_blocks == len(self.blocks), "free + used != total"
        for h, block_id in self.hash_to_block.items():
            block = self.blocks[block_id]
            assert block.hash == h, f"hash table points {h} at block {block_id} whose hash is {block.hash}"
            assert len(block.token_ids) == self.block_size, f"hashed block {block_id} is not full"
