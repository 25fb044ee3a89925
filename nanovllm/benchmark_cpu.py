"""The CPU benchmark (``nanovllm bench`` without CUDA): the bundled SmolLM2 GGUF, two greedy workloads,
each engine in its own process so that its peak resident memory is its own.

* single stream: one chat prompt (46 tokens), 256 new tokens, EOS ignored;
* batch: 32 chat prompts, 128 new tokens each, EOS ignored (nanovllm: all at once).

Baselines on the same token ids: ``llama.cpp`` (llama-cpp-python, optional: the batch runs its prompts
one at a time through the high-level API) and ``hf`` (transformers ``generate``, float32, the batch
left-padded). ``--checkout DIR`` adds another source tree of nanovllm (e.g. an older commit's worktree),
run by this file's worker with that tree first on the path and as its working directory, in the same
alternating rounds. ``--kv-cache-dtype A B ...`` runs nanovllm with each KV cache dtype in turn within
every round (the first gives the ``engine_*`` figures, the others ``kv_cache_variants``). Usage:
``python -m nanovllm.benchmark_cpu [--baseline llama.cpp|hf|none] [--checkout DIR] [--rounds N]
[--kv-cache-dtype auto float32 ...]``.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SINGLE_PROMPT = "Explain how a hash table works and when to use one instead of a list."
SINGLE_NEW, BATCH_NEW = 256, 128


def git_commit(cwd: str | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def prompt_ids(model_path: str) -> dict:
    """Token ids of both workloads, from the GGUF's own tokenizer and chat template."""
    from nanovllm.utils.chat_prompts import QUESTIONS
    from nanovllm.utils.gguf import load_gguf_tokenizer

    tok = load_gguf_tokenizer(model_path)

    def chat(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    return {"single": chat(SINGLE_PROMPT), "batch": [chat(q) for q in QUESTIONS]}


# ---- one engine per process ----------------------------------------------------------------------


def run_nanovllm(model_path: str, prompts: dict, kv_cache_dtype: str = "auto") -> dict:
    from nanovllm import LLM, SamplingParams

    start = time.perf_counter()
    kv = {} if kv_cache_dtype == "auto" else {"kv_cache_dtype": kv_cache_dtype}  # older checkouts: auto only
    llm = LLM(model_path, max_model_len=512, **kv)  # the longest sequence is 46 + 256 tokens
    load_s = time.perf_counter() - start
    llm.generate([prompts["single"][:8]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up

    def tok_s(batch: list[list[int]], new: int) -> float | None:
        if not batch:
            return None
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return len(batch) * new / (time.perf_counter() - start)

    single, batch = tok_s([prompts["single"]], SINGLE_NEW), tok_s(prompts["batch"], BATCH_NEW)
    info = {"dtype": llm.config.dtype, "quantization": getattr(llm.config, "quantization", None)}
    info["kv_cache_dtype"] = str(llm.engine.executor.kv_cache.dtype).removeprefix("torch.")
    llm.shutdown()
    return {"load_s": load_s, "single_tok_s": single, "batch_tok_s": batch, **info}


def run_llama_cpp(model_path: str, prompts: dict) -> dict:
    from llama_cpp import Llama

    from nanovllm.utils.cpu import physical_cores

    threads = int(os.environ.get("OMP_NUM_THREADS") or physical_cores())  # as our engine reads it
    start = time.perf_counter()
    llm = Llama(model_path, n_ctx=512, n_batch=512, n_threads=threads, verbose=False)
    load_s = time.perf_counter() - start

    def generate(ids: list[int], new: int) -> None:
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):  # greedy, no EOS stop
            if i + 1 == new:
                break

    generate(prompts["single"][:8], 4)  # warm-up
    start = time.perf_counter()
    generate(prompts["single"], SINGLE_NEW)
    single = SINGLE_NEW / (time.perf_counter() - start)
    start, batch = time.perf_counter(), None
    for ids in prompts["batch"]:
        generate(ids, BATCH_NEW)
    if prompts["batch"]:
        batch = len(prompts["batch"]) * BATCH_NEW / (time.perf_counter() - start)
    batched = llama_cpp_batched_tok_s(model_path, prompts["batch"], threads) if prompts["batch"] else None
    return {"load_s": load_s, "single_tok_s": single, "batch_tok_s": batch, "batched_tok_s": batched,
            "threads": threads}  # fmt: skip


def llama_cpp_batched_tok_s(model_path: str, batch: list[list[int]], threads: int) -> float:
    """llama.cpp decoding all of ``batch`` at once through its low-level API (one sequence id per
    prompt in one unified KV cache, greedy, ``BATCH_NEW`` tokens each); tok/s including the prompts."""
    import llama_cpp
    import numpy as np

    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    n = len(batch)
    params.n_ctx = -(-(n * (max(map(len, batch)) + BATCH_NEW)) // 256) * 256
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max, params.kv_unified = n, True
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    lb = llama_cpp.llama_batch_init(512, 0, n)

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """(token, position, sequence, wants logits) -> the greedy next token of each wanting entry."""
        picks = []
        for start in range(0, len(entries), 512):
            chunk = entries[start : start + 512]
            lb.n_tokens = len(chunk)
            for i, (token, pos, seq, logits) in enumerate(chunk):
                lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.logits[i] = token, pos, 1, logits
                lb.seq_id[i][0] = seq
            if llama_cpp.llama_decode(ctx, lb) != 0:
                raise RuntimeError("llama_decode failed")
            for i, entry in enumerate(chunk):
                if entry[3]:
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))
                    picks.append(int(row.argmax()))
        return picks

    try:
        start = time.perf_counter()
        entries = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(batch) for p, t in enumerate(ids)]
        tokens, positions = decode(entries), [len(ids) for ids in batch]
        for _ in range(BATCH_NEW - 1):
            tokens = decode([(t, positions[s], s, True) for s, t in enumerate(tokens)])
            positions = [p + 1 for p in positions]
        return n * BATCH_NEW / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_batch_free(lb)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def run_hf(model_path: str, prompts: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    directory, name = os.path.split(model_path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start

    def tok_s(batch: list[list[int]], new: int) -> float | None:
        if not batch:
            return None
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        return len(batch) * new / (time.perf_counter() - start)

    single, batch = tok_s([prompts["single"]], SINGLE_NEW), tok_s(prompts["batch"], BATCH_NEW)
    return {"load_s": load_s, "single_tok_s": single, "batch_tok_s": batch}


ENGINES = {"nanovllm": run_nanovllm, "llama.cpp": run_llama_cpp, "hf": run_hf}
LABELS = {
    "nanovllm": "nanovllm",
    "llama.cpp": "llama.cpp (llama-cpp-python, same GGUF; batch one prompt at a time, batched: all at once)",
    "hf": "hf transformers generate, float32 (dequantised GGUF), batch left-padded",
}


_RUN_FILE = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def measure(
    engine: str, model_path: str, prompts: dict, checkout: str | None = None, kv_cache_dtype: str = "auto"
) -> dict:
    """Run one engine's workloads in a fresh Python process; its figures plus its peak RSS.
    With ``checkout``, nanovllm is imported from that source tree (run there, with it on the path);
    ``kv_cache_dtype`` is nanovllm's."""
    run = ["-m", "nanovllm.benchmark_cpu"]
    if checkout:  # this file's worker, with the checkout's nanovllm first on the path (cwd, for -c)
        run = ["-c", _RUN_FILE, os.path.abspath(__file__)]
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "prompts.json")
        with open(spec, "w") as f:
            json.dump(prompts, f)
        cmd = [sys.executable, *run, "--worker", engine, "--model", model_path, "--prompts", spec]
        cmd += ["--kv-cache-dtype", kv_cache_dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=checkout)
    if out.returncode:
        raise RuntimeError(f"{engine} benchmark process failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}


def cpu_name() -> str:
    """e.g. "cpu (2 cores, AMD EPYC, AVX2)": physical cores, model name, the widest vector extension."""
    from nanovllm.utils.cpu import cpu_flags, physical_cores

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    isa = next(
        (name for flag, name in [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                                 ("avx2", "AVX2")] if flag in flags),
        "no AVX2",
    )  # fmt: skip
    return f"cpu ({physical_cores()} cores, {model}, {isa})"


def _median_runs(runs: list[dict]) -> dict:
    """Per field, the median over runs (numbers) or the first run's value; plus each run's tok/s."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            med = statistics.median(values)
            out[key] = (
                int(med) if all(isinstance(v, int) for v in values) and med == int(med) else round(med, 2)
            )
        else:
            out[key] = values[0]
    if len(runs) > 1:
        out["runs_single_tok_s"] = [r["single_tok_s"] for r in runs]
        out["runs_batch_tok_s"] = [r["batch_tok_s"] for r in runs]
    return out


def cpu_chat_bench(args) -> dict:
    """The record: nanovllm's figures and, with ``args.baseline``, the baseline's from the same run,
    each the median of ``args.rounds`` runs taken in turn (ours, baseline, ours, ...)."""
    from nanovllm.utils.model_source import resolve_model

    model_path = resolve_model(args.model)
    prompts = prompt_ids(model_path)
    if getattr(args, "single_only", False):
        prompts["batch"] = []
    import torch

    baseline = args.baseline if args.baseline in ENGINES and args.baseline != "nanovllm" else None
    load_before = os.getloadavg()[0]
    checkouts = getattr(args, "checkout", None) or []
    kv_dtypes = getattr(args, "kv_cache_dtype", None) or ["auto"]
    kv_dtypes = [kv_dtypes] if isinstance(kv_dtypes, str) else kv_dtypes  # nanovllm bench passes one
    ours_runs, base_runs, other_runs = [], [], {c: [] for c in checkouts}
    kv_runs = {kv: [] for kv in kv_dtypes[1:]}
    for _ in range(max(1, getattr(args, "rounds", 1))):
        ours_runs.append(measure("nanovllm", model_path, prompts, kv_cache_dtype=kv_dtypes[0]))
        for kv, runs in kv_runs.items():
            runs.append(measure("nanovllm", model_path, prompts, kv_cache_dtype=kv))
        for c in checkouts:
            other_runs[c].append(measure("nanovllm", model_path, prompts, checkout=c))
        if baseline:
            base_runs.append(measure(baseline, model_path, prompts))
    ours = _median_runs(ours_runs)
    result = {
        "bench": "cpu_chat_greedy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": cpu_name(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "rounds": len(ours_runs),
        "threads_env": os.environ.get("OMP_NUM_THREADS"),  # None: one thread per physical core
        "torch": torch.__version__,
        "model": os.path.basename(model_path),
        "workload": f"greedy, EOS ignored: single stream {len(prompts['single'])}-token chat prompt, "
        f"{SINGLE_NEW} new; batch {len(prompts['batch'])} chat prompts ({BATCH_NEW} new each)",
        **{f"engine_{k}": v for k, v in ours.items()},
        "engine_single_ms_per_token": round(1000 / ours["single_tok_s"], 2),
    }
    for kv, runs in kv_runs.items():
        result.setdefault("kv_cache_variants", []).append({"kv_cache_dtype_arg": kv, **_median_runs(runs)})
    for c, runs in other_runs.items():
        result.setdefault("checkouts", []).append({"path": c, "commit": git_commit(c), **_median_runs(runs)})
    if baseline:
        base = _median_runs(base_runs)
        result["baseline"] = LABELS[args.baseline]
        result |= {f"baseline_{k}": v for k, v in base.items()}
        result["speedup_single"] = round(ours["single_tok_s"] / base["single_tok_s"], 2)
        if ours["batch_tok_s"]:
            result["speedup_batch"] = round(ours["batch_tok_s"] / base["batch_tok_s"], 2)
            if base.get("batched_tok_s"):  # llama.cpp running the batch all at once
                result["speedup_batch_vs_batched"] = round(ours["batch_tok_s"] / base["batched_tok_s"], 2)
    return result


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="nanovllm bench (CPU)", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2)")
    p.add_argument("--baseline", choices=["none", "llama.cpp", "hf"], default="none")
    p.add_argument("--single-only", action="store_true", help="skip the 32-prompt batch workload")
    p.add_argument("--checkout", action="append", help="another nanovllm source tree to run alike")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each engine; medians are kept")
    p.add_argument(
        "--kv-cache-dtype", nargs="+", default=["auto"],
        help="nanovllm's KV cache dtype; several: each in turn every round (the first is the headline)",
    )  # fmt: skip
    p.add_argument("--results", default=os.path.join("benchmarks", "results.jsonl"))
    p.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one engine, in this process: print its figures as one JSON line
        with open(args.prompts) as f:
            prompts = json.load(f)
        kv = {"kv_cache_dtype": args.kv_cache_dtype[0]} if args.worker == "nanovllm" else {}
        r = ENGINES[args.worker](args.model, prompts, **kv)
        print(json.dumps(r | {"peak_rss_mb": peak_rss_mb()}))
        return None
    from nanovllm.config import KV_CACHE_DTYPES  # not at the top: a --checkout's worker may predate it

    if bad := [kv for kv in args.kv_cache_dtype if kv not in KV_CACHE_DTYPES]:
        p.error(f"--kv-cache-dtype {' '.join(bad)}: choose from {', '.join(KV_CACHE_DTYPES)}")
    result = cpu_chat_bench(args)
    print(json.dumps(result))
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
