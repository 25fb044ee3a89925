"""Greedy output and prefill logits against HF transformers on tiny random checkpoints (float32, CPU)."""

import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.tiny import hf_greedy, hf_model, prefill_logits

ARCHS = ["qwen3", "qwen2", "llama"]
MAX_NEW = 24


def mixed_prompts(n: int = 8, seed: int = 0, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 7, 16, 17, 33, 64, 100, 150][:n]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_ckpt):
    path = tiny_ckpt(request.param)
    model = hf_model(path)
    prompts = mixed_prompts()
    refs = [hf_greedy(model, p, MAX_NEW, eos_token_id=2) for p in prompts]
    return request.param, path, model, prompts, refs


def test_prefill_logits_match_hf(arch_setup):
    _, path, model, prompts, _ = arch_setup
    with LLM(path, dtype="float32", kvcache_block_size=16, max_model_len=512) as llm:
        logits = prefill_logits(llm, prompts)
    for p, row in zip(prompts, logits, strict=False):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0, -1]
        # float32 on both sides; differences come only from summation order (~1e-5 relative).
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [16, 256])
def test_greedy_generation_matches_hf(arch_setup, block_size):
    arch, path, _, prompts, refs = arch_setup
    with LLM(path, dtype="float32", kvcache_block_size=block_size, max_model_len=512) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    for out, ref in zip(outs, refs, strict=False):
        assert out["token_ids"] == ref
        assert out["finish_reason"] == ("stop" if ref[-1] == 2 else "length")
    assert any(len(r) == MAX_NEW for r in refs)


def test_prefix_cache_hits_keep_parity(arch_setup):
    _, path, model, _, _ = arch_setup
    rng = random.Random(1)
    shared = [rng.randrange(3, 384) for _ in range(50)]  # three full 16-token blocks + 2
    prompts = [shared + [rng.randrange(3, 384) for _ in range(k)] for k in (1, 5, 20, 40)]
    refs = [hf_greedy(model, p, MAX_NEW, eos_token_id=None) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    with LLM(path, dtype="float32", kvcache_block_size=16, max_model_len=512) as llm:
        first = llm.generate(prompts, params, use_tqdm=False)
        second = llm.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in first] == refs
    assert [o["token_ids"] for o in second] == refs
    # In the first call, the later prompts already hit the blocks the first one filled.
    assert first[0]["num_cached_tokens"] == 0
    assert all(o["num_cached_tokens"] >= 48 for o in second)


def test_preemption_keeps_parity(arch_setup):
    _, path, _, prompts, refs = arch_setup
    # 12 blocks of 16 tokens = 192 slots for 8 sequences that need up to 174 each: decode must
    # preempt, and the preempted sequences are recomputed (their prefix often from the cache).
    with LLM(path, dtype="float32", kvcache_block_size=16, max_model_len=192, num_kvcache_blocks=12) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in outs] == refs
