"""Tensor parallelism: one engine over N GPUs (NCCL) or N CPU processes (gloo).

Rank 0 is the engine's own process: it schedules, runs its model shard and samples. Ranks
1..N-1 are spawned worker processes (tp_worker.py) that each hold one shard and mirror every model
call rank 0 makes (call_channel.py carries the calls). Inside a forward the ranks meet in the
collectives of the layers (all-reduce after row-parallel linears, a gather of the logits to rank 0).

Failure handling, so that nothing hangs and nothing is left behind:
- a worker that raises reports its traceback on its pipe and exits; one that dies is seen through
  its process sentinel. Rank 0 checks both before each call and while waiting for replies, and
  raises RuntimeError naming the rank. Gloo collectives fail at once when a peer's socket closes;
  a monitor thread aborts the NCCL communicator when a worker dies so a blocked GPU step returns.
- workers ignore SIGINT (rank 0 handles Ctrl-C and shuts them down) and a watchdog thread in each
  ends it when rank 0 disappears; they are daemon processes besides.
"""

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import wait
from typing import Any
from urllib.parse import urlparse

from nanovllm.config import Config
from nanovllm.engine.call_channel import CallSender, channel_bytes
from nanovllm.engine.step import ModelRunnerOutput, SchedulerOutput
from nanovllm.engine.tp_worker import START_TIMEOUT_S, open_store, worker_main

logger = logging.getLogger("nanovllm")

STEP_TIMEOUT_S = 300.0  # a worker that is alive but silent this long after rank 0's step is stuck
WORKER_EXIT_TIMEOUT_S = 10.0  # after "shutdown", before the worker is killed
DEATH_GRACE_S = 5.0  # after a collective fails, how long to wait for the culprit to show itself


def make_executor(config: Config):
    """What runs the model for the engine: a plain ``ModelRunner`` for one rank, a
    ``TensorParallelExecutor`` for several. Both answer ``execute_model(scheduler_output)``."""
    import torch.distributed as dist

    from nanovllm.engine.model_runner import ModelRunner

    if dist.is_initialized():  # the layers would shard themselves over that group
        raise RuntimeError(
            "a torch.distributed process group is already active in this process (another "
            "tensor-parallel engine?); shut that engine down before starting this one"
        )
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    return TensorParallelExecutor(config)


def _recv(conn) -> tuple[str | None, Any]:
    """A worker's next reply; (None, None) once its end of the pipe has closed."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None, None


def _store_address(init_method: str | None) -> tuple[str, int]:
    if init_method is None:
        return "127.0.0.1", 0  # port 0: the store binds a free port, read back from store.port
    url = urlparse(init_method)
    return url.hostname, url.port


# ---- rank 0 ---------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class TensorParallelExecutor:
    """Rank 0's model runner plus the workers that mirror it: each step's ``SchedulerOutput`` goes
    to every worker, then rank 0 runs its own shard and samples."""

    def __init__(self, config: Config):
        from nanovllm.distributed import init_tensor_parallel
        from nanovllm.engine.model_runner import ModelRunner

        self.config = config
        self.world_size = n = config.tensor_parallel_size
        self.runner = None
        self.procs: list = []
        self._closed = False
        self._failure: str | None = None
        ctx = mp.get_context("spawn")
        host, port = _store_address(config.distributed_init_method)
        self.store = open_store(host, port, n, is_master=True)
        size = channel_bytes(config.max_num_seqs, config.max_model_len, config.kvcache_block_size)
        self.sender = CallSender(ctx, n - 1, size)
        self.conns = []
        try:
            for rank in range(1, n):
                parent_end, child_end = ctx.Pipe()
                args = (
                    config,
                    rank,
                    host,
                    self.store.port,
                    self.sender.name,
                    self.sender.wakeups[rank - 1],
                    child_end,
                    os.getpid(),
                )
                proc = ctx.Process(target=worker_main, args=args, name=f"nanovllm-tp{rank}", daemon=True)
                proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
            self._wait_replies("connected", START_TIMEOUT_S)
            init_tensor_parallel(0, n, self.store, config.device)
            self._monitor = threading.Thread(target=self._watch_workers, daemon=True)
            self._monitor.start()
            self.runner = self._guard(lambda: ModelRunner(config, 0))
            self._wait_replies("ready", START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self.num_blocks = self.runner.num_blocks

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._check_workers()
        self.sender.send("execute_model", sched)
        output = self._guard(lambda: self.runner.execute_model(sched))
        self._wait_replies("ok", STEP_TIMEOUT_S)
        return output

    # ---- failures --------------------------------------------------------------------------

    def _fail(self, message: str) -> WorkerError:
        """Remember the first failure (the engine cannot go on) and stop every worker."""
        if self._failure is None:
            self._failure = message
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        return WorkerError(self._failure)

    def _dead_rank_message(self, rank: int) -> str:
        kind, payload = _recv(self.conns[rank - 1]) if self.conns[rank - 1].poll() else (None, None)
        if kind == "error":
            return f"tensor-parallel worker rank {rank} raised:\n{payload}"
        proc = self.procs[rank - 1]
        proc.join(timeout=1)  # its pipe may close a moment before its exit code is known
        message = f"tensor-parallel worker rank {rank} died (exit code {proc.exitcode})"
        if self.runner is None:
            message += (
                "; it is a spawned process, so a script that starts the engine must do so "
                "under `if __name__ == '__main__':`"
            )
        return message

    def _check_workers(self) -> None:
        if self._closed:
            raise RuntimeError("the engine has been shut down")
        if self._failure is not None:
            raise WorkerError(self._failure)
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise self._fail(self._dead_rank_message(rank))

    def _guard(self, fn):
        """Run rank 0's part of a call. If it fails, blame the worker that died or raised if there
        is one; either way the ranks are out of step now, so the engine is marked failed."""
        try:
            return fn()
        except BaseException as e:
            culprit = self._find_culprit() if isinstance(e, Exception) else None
            if culprit is not None:
                raise self._fail(culprit) from e
            self._fail(f"a tensor-parallel call failed on rank 0 ({e!r}); the engine cannot go on")
            raise

    def _find_culprit(self) -> str | None:
        pending = dict(enumerate(zip(self.procs, self.conns, strict=True), start=1))
        deadline = time.monotonic() + DEATH_GRACE_S
        while pending and time.monotonic() < deadline:
            for rank, (proc, conn) in list(pending.items()):
                if not proc.is_alive():
                    return self._dead_rank_message(rank)
                if conn.poll():
                    kind, payload = _recv(conn)
                    if kind == "error":
                        return f"tensor-parallel worker rank {rank} raised:\n{payload}"
                    if kind is None:  # its pipe closed: it is dying
                        return self._dead_rank_message(rank)
                    del pending[rank]  # this one answered normally
            time.sleep(0.02)
        return None

    def _wait_replies(self, expected: str, timeout: float) -> None:
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), start=1):
            deadline = time.monotonic() + timeout
            while not wait([conn, proc.sentinel], timeout=max(0.0, deadline - time.monotonic())):
                raise self._fail(f"tensor-parallel worker rank {rank} did not answer within {timeout:.0f} s")
            kind, payload = _recv(conn) if conn.poll() else (None, None)
            if kind is None:
                raise self._fail(self._dead_rank_message(rank))
            if kind == "error":
                raise self._fail(f"tensor-parallel worker rank {rank} raised:\n{payload}")
            if kind != expected:
                raise self._fail(f"tensor-parallel worker rank {rank} answered {kind!r}, not {expected!r}")

    def _watch_workers(self) -> None:
        """On a worker's death, abort NCCL so that a step blocked in a collective returns."""
        wait([p.sentinel for p in self.procs])
        if self._closed or self.config.device != "cuda":
            return  # gloo collectives fail by themselves when a peer's socket closes
        try:
            import torch.distributed.distributed_c10d as c10d

            c10d._abort_process_group()
        except Exception:  # best effort: the step then fails on the NCCL timeout instead
            logger.exception("could not abort the NCCL process group")

    # ---- shutdown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every worker, destroy the process group and unlink the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        from nanovllm.distributed import destroy_tensor_parallel

        orderly = self._failure is None and any(p.is_alive() for p in self.procs)
        if orderly:
            with contextlib.suppress(Exception):
                self.sender.send("shutdown")
        if self.runner is not None:
            self.runner.shutdown()
        if orderly:  # tearing NCCL down can wait for every rank, so rank 0 does it alongside the workers
            with contextlib.suppress(Exception):
                destroy_tensor_parallel()
        for rank, proc in enumerate(self.procs, start=1):
            proc.join(timeout=WORKER_EXIT_TIMEOUT_S)
            if proc.is_alive():
                if self._failure is None:
                    logger.warning(
                        "tensor-parallel worker rank %d did not exit within %.0f s of shutdown; killing it",
                        rank,
                        WORKER_EXIT_TIMEOUT_S,
                    )
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        with contextlib.suppress(Exception):  # a no-op if done above; an aborted NCCL group may refuse
            destroy_tensor_parallel()
        self.sender.close()
        self.store = None
