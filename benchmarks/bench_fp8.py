"""FP8 KV cache speed on the device (issue 14): ``kv_cache_dtype`` auto against fp8, every engine
built in this one process (imports and torch.compile paid once), one JSON line per run.

    python benchmarks/bench_fp8.py [--parts long reference] [--runs 3] [--results PATH] [--note TEXT]
    NANOVLLM_FP8_TINY=1 python benchmarks/bench_fp8.py    # dry run on the CPU: tiny model and sizes
    python benchmarks/bench_fp8.py --summarize PATH       # medians and ratios of the lines in PATH

* long: the case where the cache is the limit: 64 sequences of 16,000-token prompts and 512 new
  tokens each, ``max_model_len`` 32768, auto then fp8: how many sequences run at once (the
  scheduler's running count, and the whole sequences the KV blocks hold) and the throughput.
* reference: the nano-vllm reference workload (nanovllm/benchmark.py) at Qwen3-0.6B shapes with
  random bf16 weights, auto and fp8 alternating, ``--runs`` each; the median tok/s of each dtype.
  ``--v-sub-blocks 64 256`` runs fp8 once per key-major V block size (reference.V_SUB_BLOCK) in
  each round: a layout A/B in one process.

Each run's line is appended as soon as it finishes, so a run killed by a timeout keeps the lines
before it; the summary line comes last.
"""

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.benchmark import (  # noqa: E402
    bandwidth_bound_s,
    copy_bandwidth_gbs,
    git_commit,
    workload,
    write_random_qwen3,
)
from nanovllm.kernels import reference  # noqa: E402

TINY = os.environ.get("NANOVLLM_FP8_TINY") == "1"
# name: (num_seqs, min_input, max_input, min_output, max_output, max_model_len)
WORKLOADS = {  # long first: if a device call's time runs out, the last reference run is what is lost
    "long": (64, 16000, 16000, 512, 512, 32768),
    "reference": (256, 100, 1024, 100, 1024, 4096),
}
TINY_WORKLOADS = {"long": (4, 300, 300, 8, 8, 512), "reference": (8, 10, 60, 4, 16, 256)}
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, vocab_size=10240)  # fmt: skip
RESULTS = Path(__file__).with_name("results.jsonl")
SHIPPED_V_SUB_BLOCK = reference.V_SUB_BLOCK


def run_once(
    model: str, part: str, kv: str, run: int, copy_gbs: float | None, v_sub_block: int | None = None
) -> dict:
    """One engine, one pass over the part's workload; the engine is gone (memory freed) on return.
    ``v_sub_block``: the key-major V block size for this engine's cache (default the shipped one)."""
    reference.V_SUB_BLOCK = v_sub_block or SHIPPED_V_SUB_BLOCK
    num_seqs, min_in, max_in, min_out, max_out, max_model_len = (TINY_WORKLOADS if TINY else WORKLOADS)[part]
    prompts, params = workload(num_seqs, max_in, max_out, min_input=min_in, min_output=min_out)
    sizes = {} if TINY else dict(max_num_batched_tokens=max(16384, max_model_len))
    llm = LLM(model, max_model_len=max_model_len, kv_cache_dtype=kv, skip_tokenizer_init=True, **sizes)
    engine = llm.engine
    runner = getattr(engine.executor, "runner", engine.executor)  # rank 0's model runner
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    for p, sp in zip(prompts, params, strict=True):
        engine.add_request(None, p, sp)
    max_running = decode_steps = decode_tokens = max_decode = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        max_running = max(max_running, engine.stats().num_running)
        step = engine.last_step
        if step is not None and step.num_decode_tokens:
            decode_steps += 1
            decode_tokens += step.num_decode_tokens
            max_decode = max(max_decode, step.num_decode_tokens)
    elapsed = time.perf_counter() - start
    out_tokens = sum(sp.max_tokens for sp in params)
    in_tokens = sum(map(len, prompts))
    blocks_per_seq = math.ceil((max_in + max_out) / runner.block_size)
    result = {
        "bench": "kv_cache_fp8_speed",
        "part": part,
        "run": run,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (tiny dry run)",
        "torch": torch.__version__,
        "workload": f"{num_seqs} seqs, random prompt ids, input {min_in}-{max_in}, output {min_out}-"
        f"{max_out}, temperature 0.6, ignore_eos; {out_tokens} output tokens; max_model_len {max_model_len}",
        "model": "tiny qwen3-shaped random" if TINY else "qwen3-0.6b-shaped random bf16",
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "attention_backend": runner.backend.name,
        "cuda_graphs": bool(runner.graphs),
        "kv_cache_dtype": str(runner.kv_cache.dtype).removeprefix("torch."),
        **({"v_sub_block": reference.V_SUB_BLOCK} if kv == "fp8" else {}),
        "calculate_kv_scales": False,
        "engine_seconds": round(elapsed, 2),
        "engine_tok_s": round(out_tokens / elapsed, 1),  # output tokens, as bench.py counts
        "prompt_and_output_tok_s": round((in_tokens + out_tokens) / elapsed, 1),
        "num_preemptions": engine.scheduler.num_preemptions,
        "kv_cache_blocks": runner.num_blocks,
        "kv_cache_tokens": runner.num_blocks * runner.block_size,
        "kv_cache_gib": round(runner.num_blocks * runner.block_bytes / 2**30, 2),
        "longest_seqs_the_cache_holds": runner.num_blocks // blocks_per_seq,  # max input + output each
        "max_running": max_running,
        "max_decode_batch": max_decode,
        "mean_decode_batch": round(decode_tokens / max(1, decode_steps), 1),
        "baseline": "kv_cache_dtype auto (the model dtype) in the same process and device call",
    }
    if copy_gbs:
        bound, total = bandwidth_bound_s(
            llm.config.hf_config, prompts, params, decode_steps, runner.dtype.itemsize, copy_gbs,
            runner.kv_cache.dtype.itemsize,
        )  # fmt: skip
        result.update(
            copy_gbs=round(copy_gbs, 1), bound_s=round(bound, 3), fraction_of_bound=round(bound / elapsed, 3)
        )
    refs = weakref.ref(runner), weakref.ref(runner.model)
    llm.shutdown()
    del llm, engine, runner
    gc.collect()
    # The next engine sizes its KV cache from the memory free then: this one must be gone, weights,
    # cache and graph pools included, or the two would be counted once and allocated twice.
    if any(ref() is not None for ref in refs):
        raise RuntimeError("the engine's model runner outlived its LLM; run each engine in its own process")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        result["cuda_allocated_gib_after"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        if result["cuda_allocated_gib_after"] > 0.5:
            raise RuntimeError(f"{result['cuda_allocated_gib_after']} GiB still allocated after shutdown")
    return result


def summarize(rows: list[dict]) -> dict:
    """Per part and dtype: the runs' tok/s and median, concurrency; fp8 / auto of the medians."""
    out = {"bench": "kv_cache_fp8_summary", "date": rows[-1]["date"] if rows else None}
    for part in WORKLOADS:
        mine = {}
        sub_blocks = sorted({r["v_sub_block"] for r in rows if r.get("part") == part and "v_sub_block" in r})
        for kv in ("bfloat16", "float32", "float8_e4m3fn") + tuple(f"fp8 v{n}" for n in sub_blocks[1:]):
            runs = [r for r in rows if r.get("part") == part and r.get("kv_cache_dtype") == kv]
            if kv == "float8_e4m3fn" and len(sub_blocks) > 1:  # the first block size under this name
                runs = [r for r in runs if r.get("v_sub_block") == sub_blocks[0]]
            elif kv.startswith("fp8 v"):
                runs = [r for r in rows if r.get("part") == part and r.get("v_sub_block") == int(kv[5:])]
            if runs:
                mine[kv] = {
                    "engine_tok_s": [r["engine_tok_s"] for r in runs],
                    "median_tok_s": statistics.median(r["engine_tok_s"] for r in runs),
                    "kv_cache_blocks": runs[0]["kv_cache_blocks"],
                    "longest_seqs_the_cache_holds": runs[0]["longest_seqs_the_cache_holds"],
                    "max_running": [r["max_running"] for r in runs],
                    "max_decode_batch": [r["max_decode_batch"] for r in runs],
                    "num_preemptions": [r["num_preemptions"] for r in runs],
                }
        auto = mine.get("bfloat16") or mine.get("float32")
        if auto and "float8_e4m3fn" in mine:
            mine["fp8_over_auto"] = round(mine["float8_e4m3fn"]["median_tok_s"] / auto["median_tok_s"], 3)
            if len(sub_blocks) > 1:
                mine["fp8_first_v_sub_block"] = sub_blocks[0]
            for n in sub_blocks[1:]:
                mine[f"fp8 v{n}_over_auto"] = round(
                    mine[f"fp8 v{n}"]["median_tok_s"] / auto["median_tok_s"], 3
                )
        if mine:
            out[part] = mine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--runs", type=int, default=3, help="reference runs per dtype (long: one each)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", default="")
    parser.add_argument("--ckpt-dir", default="/tmp/nanovllm-qwen3-0.6b-random")
    parser.add_argument("--summarize", metavar="PATH", help="only print the summary of PATH's lines")
    parser.add_argument("--v-sub-blocks", type=int, nargs="+", default=[None], help="fp8 V layouts to A/B")
    args = parser.parse_args()
    if args.summarize:
        rows = [r for r in map(json.loads, open(args.summarize)) if r.get("bench") == "kv_cache_fp8_speed"]
        print(json.dumps(summarize(rows), indent=1))
        return

    model = (
        write_random_qwen3(args.ckpt_dir + "-tiny", "float32", **TINY_MODEL)
        if TINY
        else write_random_qwen3(args.ckpt_dir)
    )
    copy_gbs = copy_bandwidth_gbs() if torch.cuda.is_available() else None
    rows = []
    for part in args.parts:
        per_round = [("auto", None)] + [("fp8", n) for n in args.v_sub_blocks]
        rounds = args.runs if part == "reference" else 1
        for i, (kv, sub) in enumerate(per_round * rounds):
            row = run_once(model, part, kv, i // len(per_round) + 1, copy_gbs, sub)
            if args.note:
                row["note"] = args.note
            rows.append(row)
            _append(args.results, row)
            keys = ("engine_tok_s", "max_running", "kv_cache_blocks", "num_preemptions")
            print(part, kv, "run", row["run"], {k: row[k] for k in keys}, flush=True)
    summary = summarize(rows)
    summary.update(commit=git_commit(), device=rows[0]["device"], note=args.note)
    _append(args.results, summary)
    print(json.dumps(summary, indent=1))


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
