"""A tensor-parallel worker: ranks 1..N-1, each in its own spawned process.

A worker joins the process group, builds its model shard and then serves rank 0's calls until
told to stop (see parallel.py for rank 0's side). It ignores SIGINT, since rank 0 handles Ctrl-C
and shuts it down, and a watchdog thread ends it should rank 0 disappear.
"""

import contextlib
import os
import signal
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

from nanovllm.config import Config
from nanovllm.engine.call_channel import CallReceiver
from nanovllm.engine.step import SchedulerOutput

START_TIMEOUT_S = 900.0  # loading a large checkpoint on every rank


def open_store(host: str, port: int, world_size: int, is_master: bool):
    import torch.distributed as dist

    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=is_master,
        wait_for_workers=False,
        timeout=timedelta(seconds=START_TIMEOUT_S),
    )


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)  # rank 0 is gone: nobody will ever send the next call


def worker_main(
    config: Config, rank: int, host: str, port: int, channel_name: str, wakeup, conn, parent_pid: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    runner = receiver = None
    try:
        import torch

        from nanovllm.distributed import init_tensor_parallel
        from nanovllm.engine.model_runner import ModelRunner

        if config.device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        store = open_store(host, port, config.tensor_parallel_size, is_master=False)
        conn.send(("connected", None))
        init_tensor_parallel(rank, config.tensor_parallel_size, store, config.device)
        receiver = CallReceiver(channel_name, wakeup)
        runner = ModelRunner(config, rank)
        conn.send(("ready", None))
        serve(receiver, conn, _WorkerCalls(runner))
    except BaseException:
        with contextlib.suppress(Exception):  # rank 0 may be gone already
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        _worker_cleanup(runner, receiver)


class _WorkerCalls:
    """The calls a worker answers, each mirroring one of rank 0's."""

    def __init__(self, runner):
        self.runner = runner

    def execute_model(self, sched: SchedulerOutput) -> None:
        self.runner.execute_model(sched)


def serve(receiver: CallReceiver, conn, target: Any) -> None:
    """Run each call rank 0 sends on ``target`` and reply "ok", until "shutdown"."""
    while True:
        method, args = receiver.recv()
        if method == "shutdown":
            return
        getattr(target, method)(*args)
        conn.send(("ok", None))


def _worker_cleanup(runner, receiver) -> None:
    from nanovllm.distributed import destroy_tensor_parallel

    if runner is not None:
        runner.shutdown()
    if receiver is not None:
        receiver.close()
    destroy_tensor_parallel()
