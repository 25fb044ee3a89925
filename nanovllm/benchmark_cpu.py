"""The CPU benchmark (``nanovllm bench`` without CUDA): chat prompts on the bundled SmolLM2,
against transformers ``generate`` on the same prompts."""

import datetime
import os
import random
import time

from nanovllm.benchmark import git_commit, hf_generate_padded

CHAT_TOPICS = [
    "introduce yourself",
    "list all prime numbers within 100",
    "What is the capital of France?",
    "Explain how a hash table works.",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Give me three tips for learning a new language.",
    "Summarise the plot of Romeo and Juliet.",
    "What is the difference between a list and a tuple in Python?",
    "How do vaccines work?",
    "Describe the water cycle for a ten-year-old.",
    "Suggest a name for a friendly robot.",
]


def cpu_chat_bench(args) -> dict:
    """The bundled SmolLM2 on the CPU: 32 chat prompts of mixed lengths, 64-256 new tokens each,
    against transformers ``generate`` (one left-padded batch, float32) on the same prompts."""
    import torch

    from nanovllm import LLM, SamplingParams

    rng = random.Random(0)
    llm = LLM(args.model, max_model_len=2048)
    convs = []
    for i in range(32):
        extra = " ".join(rng.choice(CHAT_TOPICS) for _ in range(rng.randint(0, 6)))  # mixed lengths
        text = CHAT_TOPICS[i % len(CHAT_TOPICS)] + (f" Context: {extra}" if extra else "")
        convs.append([{"role": "user", "content": text}])
    prompts = [llm.apply_chat_template(c) for c in convs]
    params = [
        SamplingParams(temperature=0.6, max_tokens=rng.randint(64, 256), ignore_eos=True) for _ in prompts
    ]
    total = sum(p.max_tokens for p in params)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    engine_s = time.perf_counter() - start
    model_path = llm.config.model
    llm.shutdown()
    result = {
        "bench": "cpu_chat",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "model": os.path.basename(model_path),
        "workload": f"32 chat prompts ({min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens), 64-256 new tokens ({total}), temperature 0.6, ignore_eos",
        "engine_tok_s": round(total / engine_s, 1),
    }
    if args.baseline == "hf":
        from transformers import AutoModelForCausalLM

        directory, name = os.path.split(model_path)
        kwargs = {"gguf_file": name} if name.endswith(".gguf") else {}
        model = AutoModelForCausalLM.from_pretrained(
            directory if kwargs else model_path, dtype=torch.float32, **kwargs
        ).eval()
        start = time.perf_counter()
        hf_generate_padded(model, prompts, params, "cpu")
        result["baseline"] = "hf transformers generate, one left-padded batch of 32, float32, same GGUF"
        result["baseline_tok_s"] = round(total / (time.perf_counter() - start), 1)
        result["speedup_vs_baseline"] = round(result["engine_tok_s"] / result["baseline_tok_s"], 2)
    return result
