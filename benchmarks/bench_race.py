"""The one-pass sampling kernel (kernels/sample_race.py) with the GPU's lg2.approx and with libdevice's
log2, at 1 / 64 / 256 rows of 151,936 bf16 logits (Qwen3's vocabulary). CUDA only.

Each setting: the whole ``race_sample`` (chunk kernel + the torch argmax over chunks) captured in a
CUDA graph, replayed 100 times between events, alternating settings three times; the lowest time
each. Also the time a copy of the logits takes (the memory bound). One JSON line (and --results).

    python benchmarks/bench_race.py [--results FILE]
"""

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.kernels import sample_race  # noqa: E402

VOCAB = 151936


def graph_us(fn, reps: int = 100) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    rows_list = (1, 64, 256)
    figures: dict[str, dict[int, float]] = {"lg2_approx": {}, "libdevice": {}, "copy": {}}
    for rows in rows_list:
        logits = torch.randn(rows, VOCAB, device="cuda").to(torch.bfloat16)
        temperatures = torch.full((rows,), 0.6, device="cuda")
        sink = torch.empty_like(logits)
        copy = lambda sink=sink, logits=logits: sink.copy_(logits)  # noqa: E731
        figures["copy"][rows] = round(graph_us(copy) / 2, 2)  # a read and a write: half of it
        sample = lambda logits=logits, t=temperatures: sample_race.race_sample(logits, t, seed=3)  # noqa: E731
        for _ in range(3):
            for name, fast in (("lg2_approx", True), ("libdevice", False)):
                sample_race.FAST_LOG = fast
                us = graph_us(sample)
                figures[name][rows] = round(min(us, figures[name].get(rows, us)), 2)
        sample_race.FAST_LOG = True
        print(f"rows {rows}: " + ", ".join(f"{k} {v[rows]} us" for k, v in figures.items()), flush=True)
    _record(
        {
            "bench": "race_sample_kernel",
            "device": torch.cuda.get_device_name(),
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workload": f"race_sample, [rows, {VOCAB}] bf16 logits, T 0.6, CUDA graph x100, best of 3",
            "baseline": "libdevice log2 (FAST_LOG off), alternating; copy: half a copy of the logits",
            "us": figures,
        },
        args.results,
    )


if __name__ == "__main__":
    main()
