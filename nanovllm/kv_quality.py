"""How much a quantised KV cache changes a model's outputs: the fp8 quality check.

Two engines on the same model, one with the model-dtype cache (the reference) and one with the cache
under test, are compared on

* greedy chat: the share of prompts whose first ``prefix`` tokens agree exactly, and the mean and
  largest |logprob difference| of the chosen tokens where both chose the same ones (up to the first
  disagreement; after it the two continue different texts);
* the per-token mean log-likelihood of a fixed text, prefilled in chunks so that every chunk attends
  to the earlier ones through the cache (and to its own keys, read back after the store).

Used by ``benchmarks/quality_fp8.py`` (the figures) and ``tests/test_kv_cache_fp8.py`` (loose bounds).
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import Context, forward_context

SCORING_TEXT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "scoring_text.txt"

CHAT_PROMPTS = [
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
    "How many legs does a spider have?",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Explain recursion with a simple example.",
    "What are the health benefits of walking every day?",
    "Translate 'good morning' into Spanish and German.",
    "Why do cats purr?",
    "Give me a recipe for a simple tomato soup.",
    "What is photosynthesis?",
    "How does a bicycle stay upright?",
    "Write a limerick about a forgetful wizard.",
    "What is the tallest mountain in the world?",
    "Explain what a black hole is.",
    "List five fruits that are high in vitamin C.",
    "How do I make a good first impression at a job interview?",
    "What is the Pythagorean theorem?",
    "Describe a sunset in two sentences.",
    "Why is sleep important?",
    "What does a compiler do?",
    "Tell me a fun fact about octopuses.",
]


def greedy_chat(llm, prompts: list[str], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and their logprobs."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
    outs = llm.chat(convs, params, use_tqdm=False)
    return [
        (o["token_ids"], [lp[t] for t, lp in zip(o["token_ids"], o["logprobs"], strict=True)]) for o in outs
    ]


def compare_greedy(ref: list, test: list, prefix: int = 32) -> dict:
    """Agreement of two ``greedy_chat`` results (see the module docstring)."""
    agree, diffs = 0, []
    for (ref_ids, ref_lp), (ids, lp) in zip(ref, test, strict=True):
        n = min(prefix, len(ref_ids))
        agree += ids[:n] == ref_ids[:n] and len(ids) >= n
        for a, b, la, lb in zip(ref_ids, ids, ref_lp, lp, strict=False):
            if a != b:
                break
            diffs.append(abs(la - lb))
    return {
        "first_tokens_agree_share": agree / len(ref),
        "logprob_abs_diff_mean": sum(diffs) / max(1, len(diffs)),
        "logprob_abs_diff_max": max(diffs, default=0.0),
        "logprob_tokens_compared": len(diffs),
    }


@torch.inference_mode()
def text_log_likelihood(llm, token_ids: list[int], chunk: int = 128, start: int = 0) -> float:
    """Mean log-likelihood per token of ``token_ids[start + 1:]``, prefilled ``chunk`` tokens at a
    time through the KV cache of ``llm`` (tensor parallel size 1). With ``start > 0`` the first
    ``start`` tokens are not recomputed: their K/V must be in the cache from an earlier call on the
    same tokens (as a prefix-cache hit would be).

    It writes cache blocks 0, 1, ... directly, bypassing the block manager: call it on an idle
    engine that will not serve prefix-cache hits afterwards (or on its last use)."""
    runner = llm.engine.executor
    bs, device = runner.block_size, runner.device
    n = len(token_ids)
    num_blocks = math.ceil(n / bs)
    assert num_blocks <= runner.num_blocks, f"the text needs {num_blocks} KV blocks, the cache has fewer"
    block_table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    total = 0.0
    for lo in range(start, n - 1, chunk):
        end = min(lo + chunk, n)
        ids = torch.tensor(token_ids[lo:end], device=device)
        positions = torch.arange(lo, end, device=device)
        ctx = Context(
            cu_seqlens_q=torch.tensor([0, end - lo], dtype=torch.int32, device=device),
            max_seqlen_q=end - lo,
            context_lens=torch.tensor([end], dtype=torch.int32, device=device),
            max_context_len=end,
            block_tables=block_table,
            slot_mapping=positions.clone(),  # block i holds positions i*bs .. : slot == position
        )
        with forward_context(ctx):  # no logits_indices: logits at every position
            logits = runner.model.compute_logits(runner.model(ids, positions))  # [chunk, vocab]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(token_ids[lo + 1 : end + 1], device=device)
        total += logprobs[: len(targets)].gather(1, targets[:, None]).sum().item()
    return total / (n - 1 - start)


def scoring_tokens(llm, max_tokens: int | None = None) -> list[int]:
    ids = llm.tokenizer.encode(SCORING_TEXT.read_text())
    return ids[:max_tokens] if max_tokens else ids
