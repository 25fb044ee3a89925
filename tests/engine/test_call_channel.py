"""The tensor-parallel call channel (engine/call_channel.py) between real processes: calls arrive in
order, and a worker killed while it sleeps waiting for a call cannot stall rank 0's next send."""

import multiprocessing as mp
import os
import signal
import threading
import time

from nanovllm.engine.call_channel import CallReceiver, CallSender


def _echo(name: str, wakeup, conn) -> None:
    receiver = CallReceiver(name, wakeup)
    while True:
        method, args = receiver.recv()
        conn.send((method, args))
        if method == "stop":
            break
    receiver.close()


def _sleep_on_channel(name: str, wakeup, conn) -> None:
    receiver = CallReceiver(name, wakeup)
    conn.send("asleep")
    receiver.recv()  # killed while waiting here


def _start(ctx, target, sender: CallSender):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(sender.name, sender.wakeups[0], child), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def test_calls_arrive_in_order_with_their_arguments():
    ctx = mp.get_context("spawn")
    sender = CallSender(ctx, 1, 1 << 16)
    proc, conn = _start(ctx, _echo, sender)
    try:
        for i in range(20):  # the engine's rule: the next call only after the reply to the last
            sender.send("execute_model", i, [i] * i)
            assert conn.recv() == ("execute_model", (i, [i] * i))
        sender.send("stop")
        assert conn.recv() == ("stop", ())
        proc.join(timeout=10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        sender.close()


def test_send_returns_after_a_sleeping_worker_is_killed():
    # With an Event as the wake-up, set() waited for the dead sleeper to wake and rank 0 hung for good
    # (a CI run hung in test_worker_killed_mid_run_raises_naming_the_rank when the kill landed there).
    ctx = mp.get_context("spawn")
    sender = CallSender(ctx, 1, 1 << 16)
    proc, conn = _start(ctx, _sleep_on_channel, sender)
    try:
        assert conn.recv() == "asleep"
        time.sleep(0.2)  # let it block in recv()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        sent = threading.Thread(target=sender.send, args=("execute_model", 1), daemon=True)
        sent.start()
        sent.join(timeout=10)
        assert not sent.is_alive(), "send() is stuck waiting for a dead worker"
    finally:
        sender.close()
