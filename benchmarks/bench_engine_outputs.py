"""What a streamed token costs the engine process, with and without detokenization there.

The server's engine process sends each step's outputs up a pipe as token ids (server/engine_process.py)
and the server process detokenizes them (server/output_builder.py). This measures, per token of a
batch of B streams decoding one token a step: the engine-side cost of packing and pickling the step's
message (what the engine process pays now), the incremental detokenization it no longer pays (the
same-run baseline: what the engine did before for every streamed request), and the server-side cost
of unpickling and rebuilding the outputs. CPU only, no model: outputs are made up, the tokenizer is
real (the bundled SmolLM2's by default). One JSON line goes to --results.

Usage: python benchmarks/bench_engine_outputs.py [--batch 256] [--tokens 128]
"""

import argparse
import os
import pickle
import random
import statistics
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from nanovllm.engine.outputs import CompletionOutput, EngineStats, RequestOutput  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402
from nanovllm.server.engine_process import _pack  # noqa: E402
from nanovllm.server.output_builder import OutputBuilder, load_tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="tokenizer source (default: the bundled SmolLM2)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128, help="decode steps (tokens per stream)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=os.path.join("benchmarks", "results.jsonl"))
    args = p.parse_args()
    from nanovllm.config import Config

    config = Config.from_kwargs(args.model, max_model_len=512, device="cpu")
    tokenizer = load_tokenizer(config)
    rng = random.Random(0)
    vocab = min(config.hf_config.vocab_size, 10000)
    streams = [[rng.randint(100, vocab - 1) for _ in range(args.tokens)] for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    stats = EngineStats(args.batch, 0, 0.5, 0, 0, 0)
    n = args.batch * args.tokens

    def engine_detokenize() -> float:  # the old engine's per-token work for a streamed request
        detoks = [IncrementalDetokenizer(tokenizer) for _ in streams]
        so_far: list[list[int]] = [[] for _ in streams]  # as the sequence's token list grows
        start = time.perf_counter()
        for t in range(args.tokens):
            for d, ids, seen in zip(detoks, streams, so_far, strict=True):
                seen.append(ids[t])
                d.step(seen)
        return time.perf_counter() - start

    def step_outputs(t: int) -> list[RequestOutput]:
        return [
            RequestOutput(f"r{i}", [1], [CompletionOutput(0, new_token_ids=ids[t - 1 : t])], False)
            for i, ids in enumerate(streams)
        ]

    def engine_pack() -> tuple[float, list[bytes]]:  # the new engine's extra work: the message
        outputs = [step_outputs(t) for t in range(1, args.tokens + 1)]
        start = time.perf_counter()
        messages = [pickle.dumps((0.0, stats, 0, [_pack(o) for o in outs], [])) for outs in outputs]
        return time.perf_counter() - start, messages

    def server_rebuild(messages: list[bytes]) -> float:  # the server's reader thread
        builders = {f"r{i}": OutputBuilder(f"r{i}", [1], params, tokenizer) for i in range(args.batch)}
        start = time.perf_counter()
        for m in messages:
            for packed in pickle.loads(m)[3]:
                builders[packed[0]].update(packed)
        return time.perf_counter() - start

    detok, pack, rebuild, sizes = [], [], [], []
    for _ in range(args.repeats):
        detok.append(engine_detokenize())
        seconds, messages = engine_pack()
        pack.append(seconds)
        rebuild.append(server_rebuild(messages))
        sizes.append(statistics.mean(len(m) for m in messages))
    us = {
        "engine_pack_pickle_us_per_token": round(1e6 * statistics.median(pack) / n, 2),
        "baseline_engine_detokenize_us_per_token": round(1e6 * statistics.median(detok) / n, 2),
        "server_unpickle_rebuild_detokenize_us_per_token": round(1e6 * statistics.median(rebuild) / n, 2),
        "message_bytes_per_step": round(statistics.median(sizes)),
    }
    result = {
        "bench": "engine_outputs",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": f"cpu ({os.cpu_count()} cores)",
        "model": os.path.basename(config.model.rstrip("/")),
        "workload": f"{args.batch} streams x {args.tokens} decode steps of one token, random token ids; "
        f"medians of {args.repeats}",
        **us,
        "load_average": os.getloadavg()[0],
    }
    _record(result, args.results)
    print(us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
