"""Sampling parameters end to end through the engine, against HF transformers where it has them."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.tiny import hf_model

PROMPT = [5, 17, 42, 99, 7, 250, 31, 8, 64, 3]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    with LLM(tiny_ckpt("qwen3"), dtype="float32", kvcache_block_size=16, max_model_len=256) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return hf_model(tiny_ckpt("qwen3"))


def greedy(llm, prompt=PROMPT, **kw):
    params = dict(temperature=0, max_tokens=16, ignore_eos=True)
    params.update(kw)
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_logprobs_equal_hf_log_softmax(llm, hf):
    out = greedy(llm, logprobs=5)
    assert len(out["logprobs"]) == len(out["token_ids"])
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + out["token_ids"]])).logits[0]
    ref = torch.log_softmax(logits[len(PROMPT) - 1 : -1].float(), dim=-1)
    for step, (token, lp) in enumerate(zip(out["token_ids"], out["logprobs"], strict=False)):
        top = ref[step].topk(5)
        assert list(lp)[:5] == top.indices.tolist()
        for tid, value in lp.items():
            assert value == pytest.approx(ref[step, tid].item(), abs=1e-4)  # float32, summation order only
        assert token in lp


def test_greedy_repetition_penalty_matches_hf_generate(llm, hf):
    out = greedy(llm, repetition_penalty=1.3, max_tokens=20)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(PROMPT) :].tolist()
    assert out["token_ids"] == ref
    assert out["token_ids"] != greedy(llm, max_tokens=20)["token_ids"]  # the penalty changed something


def test_stop_token_ids(llm):
    base = greedy(llm)["token_ids"]
    stop_at = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    out = greedy(llm, stop_token_ids=[base[stop_at]])
    assert out["token_ids"] == base[: stop_at + 1] and out["finish_reason"] == "stop"


def test_stop_strings_spanning_tokens(llm):
    base = greedy(llm, max_tokens=24)
    tok = llm.tokenizer
    pieces = [tok.decode(base["token_ids"][: i + 1]) for i in range(len(base["token_ids"]))]
    # A stop string made of the end of token i's text and the start of token i+1's text.
    i = next(
        i
        for i in range(2, len(pieces) - 1)
        if len(pieces[i]) - len(pieces[i - 1]) >= 1
        and len(pieces[i + 1]) - len(pieces[i]) >= 1
        and pieces[i][-1] + pieces[i + 1][len(pieces[i])] not in pieces[i - 1]
    )
    stop = pieces[i][-1] + pieces[i + 1][len(pieces[i])]
    at = pieces[i + 1].find(stop)
    out = greedy(llm, max_tokens=24, stop=[stop])
    assert out["finish_reason"] == "stop" and out["text"] == pieces[i + 1][:at]
    kept = greedy(llm, max_tokens=24, stop=stop, include_stop_str_in_output=True)
    assert kept["text"] == pieces[i + 1][: at + len(stop)]


def test_min_tokens_suppresses_stop_ids(llm):
    first = greedy(llm)["token_ids"][0]
    out = greedy(llm, stop_token_ids=[first], min_tokens=3, max_tokens=8)
    assert out["token_ids"][0] != first and len(out["token_ids"]) >= 3


def test_top_k_1_is_greedy(llm):
    sampled = llm.generate(
        [PROMPT], SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True), use_tqdm=False
    )[0]
    assert sampled["token_ids"] == greedy(llm)["token_ids"]


def test_seed_reproducible_in_any_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded, use_tqdm=False)[0]["token_ids"]
    batched = llm.generate([[9, 9, 9], PROMPT, [4] * 30], [other, seeded, other], use_tqdm=False)[1][
        "token_ids"
    ]
    assert alone == batched
    different = llm.generate(
        [PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True), use_tqdm=False
    )[0]["token_ids"]
    assert different != alone


def test_n_completions_share_prompt_blocks(llm):
    prompt = list(range(10, 50))  # 2 full 16-token blocks + 8 tokens
    engine = llm.engine
    bm = engine.scheduler.block_manager
    free_before = bm.num_free_blocks
    rid = engine.add_request(
        None, prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    )
    engine.step()  # prefill of the first child; the others wait for its blocks to be computed
    engine.step()  # the first child decodes, the other three hit its two full blocks
    # 2 shared full prompt blocks + one partial block per child; without sharing it would be 12.
    assert free_before - bm.num_free_blocks == 2 + 4
    engine.abort_request(rid)
    assert bm.num_free_blocks == free_before
    out = llm.generate(
        [prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True), use_tqdm=False
    )[0]
    samples = [tuple(c["token_ids"]) for c in out["outputs"]]
    assert len(samples) == 4 and len(set(samples)) == 4
    assert out["token_ids"] == list(samples[0])
