"""The server through the official ``openai`` client and ``curl``, against the offline engine
(``LLM.generate`` / ``LLM.chat``) and HF transformers on the same tiny checkpoint."""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanovllm import SamplingParams
from tests.server.conftest import API_KEY, curl
from tests.tiny import CORPUS

PROMPT = "The quick brown fox"
GREEDY = dict(temperature=0, max_tokens=12)


def offline(reference, prompt, **params) -> dict:
    return reference.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_completion_matches_generate(client, reference, server):
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    want = offline(reference, PROMPT, **GREEDY)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == want["finish_reason"] == "length"
    n_prompt = len(reference.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)
    assert r.usage.total_tokens == n_prompt + 12
    assert r.id.startswith("cmpl-") and r.model == model


def test_completion_stream_equals_non_stream(client, reference):
    chunks = list(
        client.completions.create(
            model=None, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline(reference, PROMPT, **GREEDY)["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_token_id_prompt_and_echo(client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    r = client.completions.create(model=None, prompt=ids, echo=True, **GREEDY)
    want = offline(reference, ids, **GREEDY)
    assert r.choices[0].text == reference.tokenizer.decode(ids) + want["text"]


def test_chat_matches_llm_chat(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    r = client.chat.completions.create(model=None, messages=messages, **GREEDY)
    want = reference.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(want["prompt_token_ids"])
    stream = client.chat.completions.create(model=None, messages=messages, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_with_seed(client):
    kw = dict(
        model=None, prompt=PROMPT, n=2, temperature=1.0, seed=7, max_tokens=8, extra_body={"ignore_eos": True}
    )
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 16
    assert r.choices[0].text != r.choices[1].text  # seeds 7 and 8
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_completion_logprobs_match_hf(client, chat_ckpt, reference):
    import torch

    from tests.tiny import hf_model

    r = client.completions.create(model=None, prompt=PROMPT, logprobs=3, temperature=0, max_tokens=6)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    ids = reference.tokenizer.encode(PROMPT)
    out = offline(reference, PROMPT, temperature=0, max_tokens=6)["token_ids"]
    with torch.no_grad():  # the reference: log-softmax of HF's logits at each greedy position
        logits = hf_model(chat_ckpt)(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1]
    want = torch.log_softmax(logits.float(), -1)
    for i, t in enumerate(out):
        assert math.isclose(lp.token_logprobs[i], want[i, t].item(), abs_tol=1e-3)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(want[i].max().item(), abs=1e-3)
        assert 3 <= len(lp.top_logprobs[i]) <= 4  # the top 3, plus the sampled token if not among them


def test_chat_logprobs_shape(client):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(
        model=None, messages=messages, logprobs=True, top_logprobs=2, max_tokens=5
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_stop_string(client, reference):
    full = offline(reference, PROMPT, temperature=0, max_tokens=24, ignore_eos=True)["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string here")
    r = client.completions.create(model=None, prompt=PROMPT, stop=[stop], temperature=0, max_tokens=24)
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_32_concurrent_clients(client, reference):
    prompts = [f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(32)]
    want = reference.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)

    def one(i: int) -> str:
        if i % 2:
            stream = client.completions.create(model=None, prompt=prompts[i], stream=True, **GREEDY)
            return "".join(c.choices[0].text for c in stream if c.choices)
        return client.completions.create(model=None, prompt=prompts[i], **GREEDY).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    assert got == [w["text"] for w in want]


def test_utility_endpoints_with_curl(server, reference):
    auth = f"Authorization: Bearer {API_KEY}"
    status, body, _ = curl(server.url + "/tokenize", {"prompt": PROMPT}, auth)
    ids = reference.tokenizer.encode(PROMPT)
    assert status == 200 and body == {"count": len(ids), "max_model_len": 256, "tokens": ids}
    status, body, _ = curl(server.url + "/detokenize", {"tokens": ids}, auth)
    assert status == 200 and body["prompt"] == reference.tokenizer.decode(ids)
    assert curl(server.url + "/version")[1]["version"]
    assert curl(server.url + "/health")[0] == 200
    status, body, _ = curl(server.url + "/v1/models", None, auth)
    assert status == 200 and body["data"][0]["max_model_len"] == 256
    metrics = server.get("/metrics")
    for name in (
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
    ):
        assert name in metrics
