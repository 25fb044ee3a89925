"""How rank 0 tells the tensor-parallel workers what to run: one call per engine step.

    rank 0                          shared memory                     worker r (1..N-1)
    send("run", seqs, True) ──► [ u32 length | pickle((method, args)) ] ──► recv() -> ("run", (seqs, True))
        └── events[r].set() ───────────────────────────────────────────────► events[r].wait(); clear()
    wait for replies      ◄──────────── pipe r: ("ok", None) or ("error", traceback) ◄── after the call

The call is pickled once and written once whatever the number of workers. Rank 0 writes the next
call only after every worker has replied to the previous one, so a worker never reads a buffer
that is being overwritten. Scheduled sequences travel as ``StepSequence``: for a decode step only
the last token, the length and the block table; for a prefill only the uncached tokens. They are
packed as columns (``StepBatch``) on the way.
"""

import math
import pickle
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from nanovllm.engine.sequence import Sequence

_HEADER = 4  # bytes of the little-endian payload length


class _TokenTail:
    """Indexes like a sequence's full token list but holds only the tokens from ``start`` on."""

    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __len__(self) -> int:
        return self.start + len(self.ids)

    def __getitem__(self, key: int | slice) -> int | list[int]:
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if lo < self.start or step != 1:
                raise IndexError(f"a worker holds tokens {self.start}.. only, not {key}")
            return self.ids[lo - self.start : max(lo, hi) - self.start]
        i = key + len(self) if key < 0 else key
        if not self.start <= i < len(self):
            raise IndexError(f"a worker holds tokens {self.start}.. only, not {key}")
        return self.ids[i - self.start]


class StepSequence:
    """What a worker needs of one scheduled sequence to build its step inputs (the same attributes
    ``ModelRunner.prepare_prefill`` / ``prepare_decode`` read of a ``Sequence``)."""

    __slots__ = ("num_tokens", "num_cached_tokens", "block_size", "block_table", "token_ids")

    def __init__(
        self,
        num_tokens: int,
        num_cached_tokens: int,
        block_size: int,
        block_table: list[int],
        tail: list[int],
    ):
        self.num_tokens, self.num_cached_tokens = num_tokens, num_cached_tokens
        self.block_size, self.block_table = block_size, block_table
        self.token_ids = _TokenTail(num_tokens - len(tail), tail)

    @classmethod
    def of(cls, seq: Sequence, is_prefill: bool) -> "StepSequence":
        tail = seq.token_ids[seq.num_cached_tokens :] if is_prefill else [seq.last_token]
        return cls(seq.num_tokens, seq.num_cached_tokens, seq.block_size, seq.block_table, tail)

    def __reduce__(self):  # a bare tuple pickles in a fraction of the bytes of the slots' dict
        n, tail = self.num_tokens, self.token_ids.ids
        return StepSequence, (n, self.num_cached_tokens, self.block_size, self.block_table, tail)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size


class StepBatch:
    """A step's sequences as columns: pickling a few lists of ints runs in C, where one
    ``StepSequence`` per sequence would cost a Python call each way."""

    __slots__ = ("block_size", "num_tokens", "num_cached_tokens", "block_tables", "tails")

    def __init__(
        self,
        block_size: int,
        num_tokens: list[int],
        num_cached_tokens: list[int],
        block_tables: list[list[int]],
        tails: list[list[int]],
    ):
        self.block_size, self.num_tokens, self.num_cached_tokens = block_size, num_tokens, num_cached_tokens
        self.block_tables, self.tails = block_tables, tails

    @classmethod
    def of(cls, seqs: list[Sequence], is_prefill: bool) -> "StepBatch":
        if is_prefill:
            tails = [s.token_ids[s.num_cached_tokens :] for s in seqs]
        else:
            tails = [[s.last_token] for s in seqs]
        return cls(
            seqs[0].block_size if seqs else 0,
            [s.num_tokens for s in seqs],
            [s.num_cached_tokens for s in seqs],
            [s.block_table for s in seqs],
            tails,
        )

    def __reduce__(self):
        columns = (self.num_tokens, self.num_cached_tokens, self.block_tables, self.tails)
        return StepBatch, (self.block_size, *columns)

    def sequences(self) -> list[StepSequence]:
        columns = zip(self.num_tokens, self.num_cached_tokens, self.block_tables, self.tails, strict=True)
        return [StepSequence(n, c, self.block_size, bt, tail) for n, c, bt, tail in columns]


def channel_bytes(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """A bound on one pickled step: every token id, block id and length pickles in at most 5 bytes
    (8 are counted), plus per-sequence overhead."""
    blocks_per_seq = math.ceil(max_model_len / block_size)
    return (64 << 10) + 8 * (max_num_batched_tokens + max_num_seqs * (blocks_per_seq + 16))


class CallSender:
    """Rank 0's end: owns (and finally unlinks) the shared memory."""

    def __init__(self, events: list, size: int):
        self.shm = SharedMemory(create=True, size=size)
        self.name = self.shm.name
        self.events = events

    def send(self, method: str, *args: Any) -> None:
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if _HEADER + len(data) > self.shm.size:
            raise RuntimeError(
                f"a {method!r} call pickles to {len(data)} bytes, more than the "
                f"{self.shm.size}-byte channel; this is a bug in channel_bytes()"
            )
        buf = self.shm.buf
        buf[:_HEADER] = len(data).to_bytes(_HEADER, "little")
        buf[_HEADER : _HEADER + len(data)] = data
        for event in self.events:
            event.set()

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


class CallReceiver:
    """A worker's end."""

    def __init__(self, name: str, event):
        self.shm = SharedMemory(name=name)
        self.event = event

    def recv(self) -> tuple[str, tuple]:
        self.event.wait()
        self.event.clear()
        buf = self.shm.buf
        n = int.from_bytes(buf[:_HEADER], "little")
        return pickle.loads(bytes(buf[_HEADER : _HEADER + n]))

    def close(self) -> None:
        self.shm.close()
