"""Throughput at tensor_parallel_size 1 and 2 on a Qwen3-8B-shaped random checkpoint (GPU only).

The checkpoint is written once, on the GPU machine itself: each named tensor is drawn with torch on
the GPU in bf16 and saved in ~2 GB safetensors shards (about 16 GB in all, never one whole model in
memory), with a config.json, an index and a tiny tokenizer. The workload is Nano-vLLM's: 256
prompts of 100-1024 random token ids, 100-1024 new tokens each, temperature 0.6, EOS ignored.

    python benchmarks/bench_tp.py --tp 1 2          # each size in its own process
    python benchmarks/bench_tp.py --tp 2 --model-dir /tmp/qwen3-8b-random

Each run prints one JSON line and appends it to benchmarks/results.jsonl (or --results).
"""

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time

QWEN3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=12288,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
    torch_dtype="bfloat16",
    architectures=["Qwen3ForCausalLM"],
)
SHARD_BYTES = 2 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # nanovllm and tests.tiny from this checkout


def qwen3_tensor_shapes(c: dict):
    """(HF Qwen3 name, shape) of every checkpoint tensor, in checkpoint order."""
    h, hd, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "self_attn.q_norm.weight", (hd,)
        yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (c["vocab_size"], h)


def write_random_checkpoint(path: str, config: dict, seed: int = 0, device: str = "cuda") -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    from tests.tiny import build_tokenizer

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    shards: list[list[tuple[str, tuple]]] = [[]]  # names grouped into ~2 GB shards, from shapes alone
    size = 0
    for name, shape in qwen3_tensor_shapes(config):
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):  # one shard in host memory at a time
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
                tensors[name] = (t * 0.02).cpu()
            weight_map[name] = fname
            total += 2 * math.prod(shape)
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    Qwen3Config(**config).save_pretrained(path)
    build_tokenizer(path)  # prompts are token ids; the tokenizer is only needed to start the engine


def run_one(args) -> dict:
    import torch

    from nanovllm import LLM, SamplingParams

    random.seed(args.seed)
    lengths = (random.randint(100, args.max_input_len) for _ in range(args.num_seqs))
    prompts = [[random.randint(0, 10000) for _ in range(n)] for n in lengths]
    max_tokens = [random.randint(100, args.max_output_len) for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    with LLM(args.model_dir, tensor_parallel_size=args.tp, enforce_eager=args.enforce_eager) as llm:
        engine = llm.engine  # the engine loop itself: the tiny tokenizer cannot decode Qwen3 ids
        engine.add_request(None, [1, 2, 3], SamplingParams(max_tokens=8))  # warm-up
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for p, sp in zip(prompts, params, strict=True):
            engine.add_request(None, p, sp)
        generated = 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            generated += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        seconds = time.perf_counter() - start
    from nanovllm.benchmark import git_commit

    return {
        "bench": "tp_throughput",
        "model": "qwen3-8b-random-bf16",
        "tp": args.tp,
        "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}",
        "num_seqs": args.num_seqs,
        "output_tokens": generated,
        "seconds": round(seconds, 2),
        "output_tok_per_s": round(generated / seconds, 1),
        "enforce_eager": args.enforce_eager,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": f"nano-vllm reference: {args.num_seqs} seqs, input 100-{args.max_input_len}, "
        f"output 100-{args.max_output_len}, temperature 0.6, ignore_eos",
        "baseline": "tp=1 on the same machine, run just before or after",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model-dir", default="/tmp/nanovllm-qwen3-8b-random")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results.jsonl"))
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        t = time.perf_counter()
        write_random_checkpoint(args.model_dir, QWEN3_8B)
        print(f"wrote {args.model_dir} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if len(args.tp) > 1:  # one process per size, so each starts with a clean GPU
        for tp in args.tp:
            cmd = [
                sys.executable,
                __file__,
                "--tp",
                str(tp),
                "--model-dir",
                args.model_dir,
                "--num-seqs",
                str(args.num_seqs),
                "--max-input-len",
                str(args.max_input_len),
                "--max-output-len",
                str(args.max_output_len),
                "--seed",
                str(args.seed),
                "--results",
                args.results,
            ]
            subprocess.run(cmd + ["--enforce-eager"] * args.enforce_eager, check=True)
        return
    args.tp = args.tp[0]
    result = run_one(args)
    print(json.dumps(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
