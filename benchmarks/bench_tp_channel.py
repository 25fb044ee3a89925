"""Per-step cost of the tensor-parallel call channel (CPU only; no model, no GPU).

For a decode step of N sequences it times, on rank 0: packing the compact StepBatch, pickling,
the shared-memory write and the event sets ("send"); and the whole round trip through W worker
processes that unpickle the call, unpack its sequences and reply on their pipes ("round trip"). In the
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

from nanovllm.engine.call_channel import CallReceiver, CallSender, StepBatch, channel_bytes
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tp_worker import serve
from nanovllm.sampling_params import SamplingParams


class _NoOp:
    def run(self, batch: StepBatch, is_prefill: bool) -> None:
        batch.sequences()  # what a worker does before building its inputs


def _worker(name: str, event, conn) -> None:
    serve(CallReceiver(name, event), conn, _NoOp())


def decode_batch(num_seqs: int, block_size: int, seed: int = 0) -> list[Sequence]:
    rng = random.Random(seed)
    seqs = []
    for _ in range(num_seqs):
        n = rng.randint(100, 2048)
        seq = Sequence([rng.randrange(151936) for _ in range(n)], SamplingParams(), block_size)
        seq.block_table = rng.sample(range(100_000), seq.num_blocks)
        seq.num_cached_tokens = n - 1
        seqs.append(seq)
    return seqs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    seqs = decode_batch(args.seqs, args.block_size)
    events = [ctx.Event() for _ in range(args.workers)]
    sender = CallSender(events, channel_bytes(16384, 512, 4096, args.block_size))
    pipes = [ctx.Pipe() for _ in range(args.workers)]
    procs = [
        ctx.Process(target=_worker, args=(sender.name, e, child), daemon=True)
        for e, (_, child) in zip(events, pipes, strict=True)
    ]
    for p in procs:
        p.start()
    send_us, trip_us = [], []
    try:
        for i in range(args.iters):
            t0 = time.perf_counter()
            sender.send("run", StepBatch.of(seqs, False), False)
            t1 = time.perf_counter()
            for parent, _ in pipes:
                assert parent.recv() == ("ok", None)
            t2 = time.perf_counter()
            if i >= 50:  # warm-up: the workers' imports and first wake-ups
                send_us.append((t1 - t0) * 1e6)
                trip_us.append((t2 - t0) * 1e6)
        payload = len(pickle.dumps(("run", (StepBatch.of(seqs, False), False))))
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
