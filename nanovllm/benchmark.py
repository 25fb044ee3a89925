"""Throughput and latency benchmark (``python bench.py`` or ``python -m nanovllm.benchmark``).

The throughput workload is the Nano-vLLM reference one, verbatim: ``random.seed(0)``; 256 prompts of
``randint(100, 1024)`` random token ids; one ``SamplingParams(temperature=0.6, ignore_eos=True,
max_tokens=randint(100, 1024))`` per prompt; throughput = sum of max_tokens / wall time of one
``generate`` after one warm-up ``generate``. With no ``--model`` it writes a Qwen3-0.6B-shaped
checkpoint with random weights (no download).
"""

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time

from nanovllm.config import KV_CACHE_DTYPES

QWEN3_0_6B = dict(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    eos_token_id=151645,
    bos_token_id=151643,
)


def workload(
    num_seqs: int = 256,
    max_input: int = 1024,
    max_output: int = 1024,
    seed: int = 0,
    min_input: int = 100,
    min_output: int = 100,
):
    from nanovllm import SamplingParams

    random.seed(seed)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(min_input, max_input))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(min_output, max_output))
        for _ in range(num_seqs)
    ]
    return prompts, params


def write_random_qwen3(path: str, dtype: str = "bfloat16", **sizes) -> str:
    """A Qwen3-0.6B-shaped checkpoint with random weights, built on the GPU when there is one;
    ``sizes`` override config fields (a tiny model for dry runs)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**QWEN3_0_6B, **sizes}, dtype=dtype, architectures=["Qwen3ForCausalLM"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


def git_commit() -> str:
    if os.environ.get("NANOVLLM_COMMIT"):  # set where the checkout has no git history (the GPU machine)
        return os.environ["NANOVLLM_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) on 1 GiB buffers."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3) / 1e9


def run_steps(llm, prompts, params) -> list:
    """Drive the engine step by step (no progress bar) and return every step's ``StepStats``."""
    engine = llm.engine
    for p, sp in zip(prompts, params, strict=False):
        engine.add_request(None, p, sp)
    stats = []
    while engine.has_unfinished_requests():
        before = engine.last_step
        engine.step()
        if engine.last_step is not before:  # a call that only launched (async scheduling) finished no step
            stats.append(engine.last_step)
    return stats


def decode_latency_ms(llm, batch: int, prompt_len: int = 128, new_tokens: int = 128) -> float:
    from nanovllm import SamplingParams

    rng = random.Random(batch)
    prompts = [[rng.randint(0, 10000) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=new_tokens)
    stats = [s for s in run_steps(llm, prompts, [params] * batch) if not s.num_prefill_tokens]
    stats = stats[len(stats) // 4 :]  # steady state
    return 1e3 * sum(s.seconds for s in stats) / len(stats)


def prefill_tok_s(llm, num_seqs: int = 8, length: int = 1024) -> float:
    from nanovllm import SamplingParams

    rng = random.Random(1)
    prompts = [[rng.randint(0, 10000) for _ in range(length)] for _ in range(num_seqs)]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1)
    # Wall time of the whole run: with async scheduling a step's stats arrive with the next call.
    start = time.perf_counter()
    run_steps(llm, prompts, [params] * num_seqs)
    return num_seqs * length / (time.perf_counter() - start)


def bandwidth_bound_s(
    hf_config, prompts, params, num_decode_steps: int, dtype_bytes: int, copy_gbs: float, kv_bytes: int = 0
):
    """Seconds the workload needs at copy bandwidth: weights once per step, every cached K/V once
    per generated token, and every prompt token's K/V written once. ``kv_bytes``: bytes per cached
    element (0: ``dtype_bytes``)."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * (kv_bytes or dtype_bytes)
    inter, h, v = c.intermediate_size, c.hidden_size, c.vocab_size
    qkv = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    layer = qkv + c.num_attention_heads * head_dim * h + 3 * h * inter
    weights = (c.num_hidden_layers * layer + v * h) * dtype_bytes
    kv_read = sum(
        kv_per_token * (len(p) * sp.max_tokens + sp.max_tokens * (sp.max_tokens - 1) // 2)
        for p, sp in zip(prompts, params, strict=False)
    )
    kv_write = kv_per_token * sum(len(p) + sp.max_tokens for p, sp in zip(prompts, params, strict=False))
    total = weights * num_decode_steps + kv_read + kv_write
    return total / (copy_gbs * 1e9), total


def hf_generate_padded(model, prompts: list[list[int]], params: list, device: str) -> None:
    """One transformers ``generate`` over a left-padded batch, sampling at temperature 0.6 with
    no EOS, as long as the batch's largest ``max_tokens``."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        model.generate(
            ids, attention_mask=mask, do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
            max_new_tokens=max(sp.max_tokens for sp in params), eos_token_id=None, pad_token_id=0,
        )  # fmt: skip


def hf_baseline_tok_s(model_path: str, prompts, params, chunk: int = 64) -> float:
    """transformers generate on the same workload: arrival order, chunks of 64, left-padded, sdpa."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to("cuda").eval()
    start = time.perf_counter()
    for i in range(0, len(prompts), chunk):
        hf_generate_padded(model, prompts[i : i + chunk], params[i : i + chunk], "cuda")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return sum(sp.max_tokens for sp in params) / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="nanovllm bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random Qwen3-0.6B-shaped checkpoint)")
    parser.add_argument("--ckpt-dir", default="/tmp/nanovllm-qwen3-0.6b-random")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=1024)
    parser.add_argument("--min-input", type=int, default=100)
    parser.add_argument("--min-output", type=int, default=100)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    parser.add_argument("--calculate-kv-scales", action="store_true")
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument(
        "--baseline-seqs",
        type=int,
        default=None,
        help="run the HF baseline on the first N prompts only (it is slow); default all",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the decode-latency and prefill runs")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    parser.add_argument("--no-chunked-prefill", action="store_true", help="whole-prompt prefill steps")
    parser.add_argument(
        "--no-async-scheduling", action="store_true", help="wait for each step before scheduling the next"
    )
    parser.add_argument("--results", default=os.path.join("benchmarks", "results.jsonl"))
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--preset",
        choices=["auto", "gpu", "cpu-chat"],
        default="auto",
        help="gpu: the throughput workload; cpu-chat: SmolLM2 chat prompts on the CPU "
        "(auto: gpu when CUDA is available)",
    )
    args = parser.parse_args(argv)

    import torch

    from nanovllm import LLM

    if args.preset == "cpu-chat" or (args.preset == "auto" and not torch.cuda.is_available()):
        from nanovllm.benchmark_cpu import cpu_chat_bench

        return _record(cpu_chat_bench(args), args.results)

    model = args.model or write_random_qwen3(args.ckpt_dir)
    prompts, params = workload(
        args.num_seqs, args.max_input, args.max_output, min_input=args.min_input, min_output=args.min_output
    )
    llm = LLM(
        model,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=max(16384, args.max_model_len),
        kv_cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales,
        attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        skip_tokenizer_init=True,
        **engine_overrides(args),
    )
    runner = getattr(llm.engine.executor, "runner", llm.engine.executor)  # rank 0's runner
    llm.generate([[1, 2, 3]], params[0], use_tqdm=False)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = run_steps(llm, prompts, params)
    elapsed = time.perf_counter() - start
    total_tokens = sum(sp.max_tokens for sp in params)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "workload": f"nano-vllm reference: {args.num_seqs} seqs, input {args.min_input}-{args.max_input}, "
        f"output {args.min_output}-{args.max_output}, temperature 0.6, ignore_eos; {total_tokens} output "
        f"tokens; max_model_len {args.max_model_len}",
        "model": "qwen3-0.6b-shaped random bf16" if not args.model else args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "enable_chunked_prefill": llm.config.enable_chunked_prefill,
        "async_scheduling": llm.config.async_scheduling,
        "attention_backend": runner.backend.name,
        "cuda_graphs": bool(runner.graphs),
        "engine_tok_s": round(total_tokens / elapsed, 1),
        "engine_seconds": round(elapsed, 2),
        "num_preemptions": llm.engine.scheduler.num_preemptions,
        "kv_cache_blocks": runner.num_blocks,
        "kv_cache_dtype": str(runner.kv_cache.dtype).removeprefix("torch."),
        "calculate_kv_scales": args.calculate_kv_scales,
        "max_decode_batch": max((s.num_decode_tokens for s in stats), default=0),
    }
    if torch.cuda.is_available():
        copy_gbs = copy_bandwidth_gbs()
        decode_steps = sum(1 for s in stats if s.num_decode_tokens)
        bound, total_bytes = bandwidth_bound_s(
            llm.config.hf_config, prompts, params, decode_steps, runner.dtype.itemsize, copy_gbs,
            runner.kv_cache.dtype.itemsize,
        )  # fmt: skip
        result.update(
            copy_gbs=round(copy_gbs, 1),
            bound_s=round(bound, 3),
            bytes_moved_gb=round(total_bytes / 1e9, 1),
            fraction_of_bound=round(bound / elapsed, 3),
            kv_cache_gib=round(runner.num_blocks * runner.block_bytes / (1 << 30), 2),
        )
        if hasattr(runner, "memory_profile"):
            mem = runner.memory_profile
            result["memory_gib"] = {k: round(v, 2) for k, v in mem.items()}
            result["kv_share_of_memory_after_weights"] = round(
                result["kv_cache_gib"] / (mem["total"] - mem["weights_and_buffers"]), 3
            )
    if not args.no_latency:
        for bs in (1, 8, 64):
            result[f"decode_ms_bs{bs}"] = round(decode_latency_ms(llm, bs), 3)
        result["prefill_tok_s"] = round(prefill_tok_s(llm), 1)
    llm.shutdown()
    if args.baseline == "hf":
        n = args.baseline_seqs or len(prompts)
        result["baseline"] = (
            f"hf transformers generate, sdpa, chunks of 64, left-padded, bf16, first {n} prompts"
        )
        result["baseline_tok_s"] = round(hf_baseline_tok_s(model, prompts[:n], params[:n]), 1)
        result["speedup_vs_baseline"] = round(result["engine_tok_s"] / result["baseline_tok_s"], 2)
    if args.note:
        result["note"] = args.note
    return _record(result, args.results)


def engine_overrides(args) -> dict:
    out = {}
    if args.max_num_batched_tokens:
        out["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.no_chunked_prefill:
        out["enable_chunked_prefill"] = False
    if args.no_async_scheduling:
        out["async_scheduling"] = False
    return out


def _record(result: dict, path: str | None) -> dict:
    line = json.dumps(result)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    print(line)
    return result


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main(sys.argv[1:])
