"""How rank 0 tells the tensor-parallel workers what to run: one call per engine step.

    rank 0                               shared memory                    worker r (1..N-1)
    send("execute_model", sched) ──► [ u32 length | pickle((method, args)) ] ──► recv() -> (method, args)
        └── wakeups[r].release() ──────────────────────────────────────────► wakeups[r].acquire()
    wait for replies      ◄──────────── pipe r: ("ok", None) or ("error", traceback) ◄── after the call

The call is pickled once and written once whatever the number of workers. Rank 0 writes the next
call only after every worker has replied to the previous one, so a worker never reads a buffer
that is being overwritten. Each worker sleeps on a semaphore of its own (``ctx.Semaphore(0)``), not an
``Event``: an Event's ``set()`` waits until every sleeper has woken, so a worker killed while it slept
would hang rank 0's next call; a semaphore's ``release()`` never waits, and the dead worker is then
found by the reply wait. A step travels as the scheduler's ``SchedulerOutput`` (engine/step.py):
only what changed since the workers' last step, mostly columns of ints.
"""

import math
import pickle
from multiprocessing.shared_memory import SharedMemory
from typing import Any

_HEADER = 4  # bytes of the little-endian payload length


def channel_bytes(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """A bound on one pickled step. The largest carries every scheduled sequence in full (after the
    workers dropped their state): each token id, block id and length pickles in at most 5 bytes
    (8 are counted), plus about 1 KiB per sequence for its sampling parameters."""
    blocks_per_seq = math.ceil(max_model_len / block_size)
    return (64 << 10) + max_num_seqs * (8 * (max_model_len + blocks_per_seq + 16) + 1024)


class CallSender:
    """Rank 0's end: owns (and finally unlinks) the shared memory; ``wakeups[r]`` goes to worker r + 1's
    ``CallReceiver``."""

    def __init__(self, ctx, num_workers: int, size: int):
        self.wakeups = [ctx.Semaphore(0) for _ in range(num_workers)]  # not Events: see the docstring
        self.shm = SharedMemory(create=True, size=size)
        self.name = self.shm.name

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
        for wakeup in self.wakeups:
            wakeup.release()

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


class CallReceiver:
    """A worker's end."""

    def __init__(self, name: str, wakeup):
        self.shm = SharedMemory(name=name)
        self.wakeup = wakeup

    def recv(self) -> tuple[str, tuple]:
        self.wakeup.acquire()
        buf = self.shm.buf
        n = int.from_bytes(buf[:_HEADER], "little")
        return pickle.loads(bytes(buf[_HEADER : _HEADER + n]))

    def close(self) -> None:
        self.shm.close()
