"""Decode latency of kernel variants in one process: PDL on / off, GEMV block sizes.

One engine on a Qwen3-0.6B-shaped random checkpoint; for each variant the module settings are put
back to the shipped ones, the variant's applied, and the CUDA graphs captured again; then
``bench.py``'s decode-latency measurement runs (128 new tokens, steady-state steps) at batch 1 with
a 128- and a 2048-token prompt, and batch 8 and 64 with 128. Variants alternate, ``--rounds`` times.
Ends with one JSON line (also appended to ``--results``).

    python benchmarks/bench_decode_variants.py [--variants shipped pdl_off ...] [--rounds 2] [--results FILE]
"""

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.benchmark import _record, decode_latency_ms, git_commit, write_random_qwen3  # noqa: E402
from nanovllm.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from nanovllm.kernels import gemv, pdl  # noqa: E402

SHIPPED = {
    "pdl": pdl._enabled,
    "gemv": dict(gemv.GEMV_CONFIGS),
    "norm": dict(gemv.NORM_CONFIGS),
}


def restore() -> None:
    pdl._enabled = SHIPPED["pdl"]
    gemv.GEMV_CONFIGS.clear()
    gemv.GEMV_CONFIGS.update(SHIPPED["gemv"])
    gemv.NORM_CONFIGS.clear()
    gemv.NORM_CONFIGS.update(SHIPPED["norm"])


def variant(name: str) -> None:
    """Apply one named variant on top of the shipped settings."""
    kind, _, arg = name.partition(":")
    if kind == "shipped":
        return
    if kind == "pdl_off":
        pdl._enabled = lambda index: False
    elif kind in ("gemv", "norm"):  # gemv:N,K,block_n,block_k[,num_warps]: the M = 1 config of one shape
        n, k, *cfg = (int(x) for x in arg.split(","))
        table = gemv.GEMV_CONFIGS if kind == "gemv" else gemv.NORM_CONFIGS
        key = (n, k) if kind == "gemv" else (n, k, 1)
        table[key] = gemv.GemvConfig(cfg[0], cfg[1], 1, *(cfg[2:] or [4]))
    else:
        raise ValueError(f"unknown variant {name!r}")


CASES = [(1, 128), (1, 2048), (8, 128), (64, 128)]  # (batch, prompt tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["shipped", "pdl_off"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ckpt-dir", default="/tmp/ck")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    llm = LLM(write_random_qwen3(args.ckpt_dir), max_model_len=4096, skip_tokenizer_init=True)
    runner = getattr(llm.engine.executor, "runner", llm.engine.executor)  # rank 0's runner
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            restore()
            variant(name)
            runner.graphs = None
            torch.cuda.synchronize()
            runner.graphs = DecodeGraphs(runner.model, runner.config, runner.device)
            decode_latency_ms(llm, 1, new_tokens=32)  # warm-up: eager kernels of this variant
            for bs, prompt in CASES:
                ms = decode_latency_ms(llm, bs, prompt_len=prompt)
                figures[name].setdefault(f"bs{bs}_p{prompt}", []).append(ms)
                print(
                    f"variant {name:>24} batch {bs:>2} prompt {prompt:>4}: {ms:.3f} ms per step", flush=True
                )
    restore()
    llm.shutdown()
    result = {
        "bench": "decode_variants_latency",
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workload": "Qwen3-0.6B-shaped random bf16, CUDA graphs, async scheduling; bench.py decode latency "
        "(128 new tokens, temperature 0.6, steady-state steps), batch 1 / 8 / 64, prompts of 128 or 2048",
        "baseline": "the shipped settings (variant 'shipped'), alternating, graphs captured again each time",
        "ms_per_step": {
            name: {c: [round(x, 3) for x in v] for c, v in f.items()} for name, f in figures.items()
        },
        "median_ms": {
            name: {c: round(statistics.median(v), 3) for c, v in f.items()} for name, f in figures.items()
        },
    }
    _record(result, args.results)


if __name__ == "__main__":
    main()
