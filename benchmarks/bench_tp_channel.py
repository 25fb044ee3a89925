"""Per-step cost of the tensor-parallel call channel (CPU only; no model, no GPU).

For a decode step of N sequences it times, on rank 0: pickling the step's ``SchedulerOutput``,
the shared-memory write and the wake-ups ("send"); and the whole round trip through W worker
processes that unpickle the call and reply on their pipes ("round trip"). In the
engine the round trip overlaps rank 0's own forward, so "send" is what a step pays for sure.

    python benchmarks/bench_tp_channel.py --seqs 256 --workers 1 --block-size 16
"""

import argparse
import json
import multiprocessing as mp
import pickle
import random
import statistics
import time

from nanovllm.engine.call_channel import CallReceiver, CallSender, channel_bytes
from nanovllm.engine.step import CachedSeqs, SchedulerOutput
from nanovllm.engine.tp_worker import serve


class _NoOp:
    def execute_model(self, sched: SchedulerOutput) -> None:
        pass


def _worker(name: str, wakeup, conn) -> None:
    serve(CallReceiver(name, wakeup), conn, _NoOp())


def decode_step(num_seqs: int, block_size: int, seed: int = 0) -> SchedulerOutput:
    """A decode step as the scheduler sends it: one new token per sequence, a new block now and then."""
    rng = random.Random(seed)
    cached = CachedSeqs()
    out = SchedulerOutput(cached_seqs=cached)
    for seq_id in range(num_seqs):
        n = rng.randint(100, 2048)
        cached.seq_ids.append(seq_id)
        cached.new_token_ids.append([rng.randrange(151936)])
        cached.new_block_ids.append([rng.randrange(100_000)] if n % block_size == 0 else [])
        cached.num_computed_tokens.append(n - 1)
        out.num_scheduled_tokens[seq_id] = 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    step = decode_step(args.seqs, args.block_size)
    sender = CallSender(ctx, args.workers, channel_bytes(512, 4096, args.block_size))
    pipes = [ctx.Pipe() for _ in range(args.workers)]
    procs = [
        ctx.Process(target=_worker, args=(sender.name, e, child), daemon=True)
        for e, (_, child) in zip(sender.wakeups, pipes, strict=True)
    ]
    for p in procs:
        p.start()
    send_us, trip_us = [], []
    try:
        for i in range(args.iters):
            t0 = time.perf_counter()
            sender.send("execute_model", step)
            t1 = time.perf_counter()
            for parent, _ in pipes:
                assert parent.recv() == ("ok", None)
            t2 = time.perf_counter()
            if i >= 50:  # warm-up: the workers' imports and first wake-ups
                send_us.append((t1 - t0) * 1e6)
                trip_us.append((t2 - t0) * 1e6)
        payload = len(pickle.dumps(("execute_model", (step,))))
    finally:
        sender.send("shutdown")
        for p in procs:
            p.join(timeout=10)
        sender.close()
    print(
        json.dumps(
            {
                "bench": "tp_channel",
                "num_seqs": args.seqs,
                "workers": args.workers,
                "block_size": args.block_size,
                "payload_bytes": payload,
                "send_us_median": round(statistics.median(send_us), 1),
                "round_trip_us_median": round(statistics.median(trip_us), 1),
                "round_trip_us_p90": round(statistics.quantiles(trip_us, n=10)[-1], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
