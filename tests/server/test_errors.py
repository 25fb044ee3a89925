"""Every error row of the issue, with curl: the status, OpenAI's error shape, a message that names
the problem, and a server that keeps serving afterwards."""

import json
import threading

import pytest

from tests.server.conftest import API_KEY, ENGINE_ARGS, Server, curl, engine_flags

AUTH = f"Authorization: Bearer {API_KEY}"


def error_of(status, body, want_status, *words):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_p", 7),
        ("temperature", -1),
        ("n", 0),
        ("max_tokens", 0),
        ("presence_penalty", 3),
        ("logprobs", 50),
        ("min_p", 2),
        ("top_k", -5),
    ],
)
def test_invalid_sampling_parameter_names_the_field(server, field, value):
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": "hi", field: value}, AUTH)
    assert error_of(status, body, 400, field)["param"] == field


def test_context_length_says_both_numbers(server):
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": "hello", "max_tokens": 300}, AUTH)
    e = error_of(status, body, 400, "256", "300")
    assert e["param"] == "max_tokens" and e["code"] == "context_length_exceeded"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}
    status, body, _ = curl(server.url + "/v1/chat/completions", chat, AUTH)
    assert error_of(status, body, 400, "256", "1000")["param"] == "max_completion_tokens"
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": list(range(3, 263))}, AUTH)
    error_of(status, body, 400, "256", "260")


def test_bad_prompts(server):
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": [5, 99999]}, AUTH)
    error_of(status, body, 400, "99999", "vocabulary")
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": []}, AUTH)
    error_of(status, body, 400, "empty")
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": ["a", "b"]}, AUTH)
    error_of(status, body, 400, "2 prompts")


def test_unknown_model_is_404(server):
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, AUTH)
    assert error_of(status, body, 404, "gpt-9")["code"] == "model_not_found"


def test_api_key(server):
    for headers in ((), ("Authorization: Bearer wrong",), ("Authorization: test-key",)):
        status, body, hdrs = curl(server.url + "/v1/completions", {"prompt": "hi"}, *headers)
        assert error_of(status, body, 401, "API key")["code"] == "invalid_api_key"
    assert curl(server.url + "/v1/models")[0] == 401
    assert curl(server.url + "/health")[0] == 200  # probes need no key


def test_body_over_limit_is_413(server):
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": "x" * 70000}, AUTH)
    assert error_of(status, body, 413, "65536", "--max-body-bytes")["code"] == "request_too_large"
    # Chunked upload (no Content-Length): the limit holds too.
    big = json.dumps({"prompt": "x" * 70000}).encode()
    status, body, _ = curl(server.url + "/v1/completions", None, AUTH, "Transfer-Encoding: chunked", raw=big)
    error_of(status, body, 413, "65536")


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"prompt": "hi"', ["JSON"]),
        (b'{"prompt": "hi", "max_tokens": "5"}', ["max_tokens"]),
        (b'{"prompt": "hi", "logit_bias": {"1": 5}}', ["logit_bias"]),
        (b"[1, 2]", ["object"]),
        (b'{"max_tokens": 5}', ["prompt"]),
    ],
)
def test_malformed_requests_never_reach_the_engine(server, raw, words):
    before = server.metrics()["vllm:prompt_tokens_total"]
    status, body, _ = curl(server.url + "/v1/completions", None, AUTH, raw=raw)
    error_of(status, body, 400, *words)
    assert server.metrics()["vllm:prompt_tokens_total"] == before


def test_chat_errors(server):
    url = server.url + "/v1/chat/completions"
    status, body, _ = curl(url, {"messages": []}, AUTH)
    error_of(status, body, 400, "messages")
    status, body, _ = curl(url, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH)
    error_of(status, body, 400, "role")
    status, body, _ = curl(url, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, AUTH)
    error_of(status, body, 400, "logprobs")


def test_still_serving_after_errors(server):
    status, body, _ = curl(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 3}, AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


@pytest.mark.slow
def test_503_with_retry_after_over_max_waiting_requests(chat_ckpt):
    args = {**ENGINE_ARGS, "max_num_seqs": 1}
    server = Server(chat_ckpt, "--max-waiting-requests", "2", *engine_flags(**args))
    try:
        results = []
        body = {"prompt": "hello", "max_tokens": 60, "ignore_eos": True}

        def one():
            results.append(curl(server.url + "/v1/completions", body))

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 503}, statuses
        for status, body, headers in results:
            if status == 503:
                assert error_of(status, body, 503, "--max-waiting-requests")["code"] == "server_busy"
                assert headers["retry-after"] == "1"
            else:
                assert body["usage"]["completion_tokens"] == 60
    finally:
        assert server.stop() == 0
