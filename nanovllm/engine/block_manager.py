"""Paged KV-cache bookkeeping with prefix caching. Pure Python: no torch.

The KV cache is cut into ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns a
``block_table``: the ids of the blocks that hold its tokens, in order. The table grows as steps
compute more of the sequence (a chunked prefill takes blocks chunk by chunk)::

    tokens:       [ t0 .. t15 | t16 .. t31 | t32 .. t40 ]       block_size 16
    block_table:  [     7     |     2      |     9      ]
    computed:     <------ K/V written ------>|  new  |           num_computed_tokens = 32

Prefix caching. A *full* block is identified by a chained hash::

    hash(block i) = xxh64( hash(block i-1) as 8 bytes  ||  the block's token ids as uint32 )

so equal hashes mean equal token prefixes, not just equal blocks (the chain starts from -1 for
block 0). ``hash_to_block`` maps hashes to blocks whose K/V have been *computed*: a block is
registered only after the step that wrote all of it succeeded (``cache_computed_blocks``), so a
step that raises half-way leaves nothing findable that holds unwritten K/V. A hit is double-checked
by comparing token ids, so a hash collision can cost a cache miss, never a wrong answer.

Lifecycle of a block::

    free (ref_count 0, maybe still hashed) --allocate/hit--> used (ref_count = number of sequences)
    used --last user frees it--> free again, appended to the back of the free queue

Free blocks keep their hash until they are handed out for other content, so a prefix freed
recently can still be hit; reuse takes the least recently freed block first (LRU).

At most ``num_tokens - 1`` tokens are served from the cache: the last token is always computed,
because its logits choose the next token.
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
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Share of blocks held by sequences (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / len(self.blocks)

    # ---- prefix cache ----------------------------------------------------------------------

    def block_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of every full block of ``seq`` (cached on the sequence, extended as it grows)."""
        hashes = seq.block_hashes
        for i in range(len(hashes), seq.num_tokens // self.block_size):
            hashes.append(compute_block_hash(seq.block(i), hashes[-1] if hashes else -1))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Ids of the leading blocks of ``seq`` whose K/V the cache already holds (at most
        ``num_tokens - 1`` tokens' worth)."""
        max_hits = (seq.num_tokens - 1) // self.block_size
        hits = []
        for i, h in enumerate(self.block_hashes(seq)[:max_hits]):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != seq.block(i):
                break
            hits.append(block_id)
        return hits

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """After a step succeeded: make the blocks that are now full and computed findable."""
        end = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if end <= seq.num_cached_blocks:
            return
        hashes = self.block_hashes(seq)
        for i in range(seq.num_cached_blocks, end):
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                block.hash, block.token_ids = hashes[i], seq.block(i)
                # A newer block with the same content takes the hash over; the older one keeps
                # its own until reused (see _take_free_block).
                self.hash_to_block[hashes[i]] = block.block_id
        seq.num_cached_blocks = end

    # ---- allocation ------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, hits: list[int] | None = None) -> bool:
        """Grow ``seq``'s block table to hold ``num_new_tokens`` more than it computed or has in
        flight.

        On admission ``hits`` (from ``get_computed_blocks``) are taken first and set
        ``num_computed_tokens``. Returns False, changing nothing, when the free blocks do not
        suffice (a hit on a free block takes that block out of the free list, so it counts too).
        """
        hits = hits or []
        num_computed = (
            len(hits) * self.block_size if hits else seq.num_computed_tokens + seq.num_inflight_tokens
        )
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(seq.block_table) - len(hits)
        hits_on_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if needed + hits_on_free > self.num_free_blocks:
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if hits:
            seq.num_computed_tokens = num_computed
        for _ in range(needed):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def _take_free_block(self) -> Block:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        return block

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finish, abort or preemption); it computes from scratch
        (or from the prefix cache) if admitted again."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_blocks = 0
        seq.reset_inflight()  # what steps in flight compute for it is dropped when they finish

    # ---- invariants (tests call this after every step) ------------------------------------

    def check_integrity(self, seqs: list[Sequence]) -> None:
        users: dict[int, int] = {}
        for seq in seqs:
            for block_id in seq.block_table:
                users[block_id] = users.get(block_id, 0) + 1
            assert seq.num_computed_tokens <= len(seq.block_table) * self.block_size, (
                f"{seq} outgrew its blocks"
            )
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
        for seq in seqs:  # a registered block of a sequence holds computed K/V
            for i, block_id in enumerate(seq.block_table):
                if self.hash_to_block.get(self.blocks[block_id].hash) == block_id:
                    assert self.blocks[block_id].token_ids == seq.block(i), f"block {block_id} content"
                    assert seq.num_computed_tokens >= (i + 1) * self.block_size, (
                        f"block {block_id} is findable but {seq} has not computed it"
                    )
