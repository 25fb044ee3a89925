"""The public API and its errors: bad input is a clear ValueError and the engine stays usable."""

import json
import os
import shutil

import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    with LLM(tiny_ckpt("qwen3"), kvcache_block_size=16, max_model_len=64) as llm:
        yield llm


def test_generate_returns_dicts_in_order(llm):
    outs = llm.generate(["hello world", "The quick brown fox"], GREEDY, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outs] == [4, 4]
    assert {"text", "token_ids", "finish_reason", "num_cached_tokens"} <= set(outs[0])
    assert outs[0]["text"] == llm.tokenizer.decode(outs[0]["token_ids"], skip_special_tokens=True)
    single = llm.generate("hello world", GREEDY, use_tqdm=False)
    assert single[0]["token_ids"] == outs[0]["token_ids"]
    per_prompt = llm.generate(
        [[5, 6], [7, 8]], [GREEDY, SamplingParams(temperature=0, max_tokens=2)], use_tqdm=False
    )
    assert [len(o["token_ids"]) for o in per_prompt] == [4, 2]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "empty"),
        ([], "empty"),
        ([5, 10_000], "outside the vocabulary"),
        ([5, -1], "outside the vocabulary"),
        ([5] * 65, "max_model_len"),
    ],
)
def test_bad_prompts_raise_and_engine_stays_usable(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7], prompt], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 4


def test_bad_request_does_not_lose_others(llm):
    engine = llm.engine
    good = engine.add_request("good", [5, 6, 7], GREEDY)
    with pytest.raises(ValueError):
        engine.add_request("bad", [], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", [5], GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished[good].outputs[0].token_ids) == 4


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate(
        [[5] * 60], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False
    )[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 4


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_unknown_engine_argument_is_a_type_error(tiny_ckpt):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(tiny_ckpt("qwen3"), max_num_seq=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kvcache_block_size=24), "power of two"),
        (dict(dtype="int8"), "dtype"),
        (dict(max_num_batched_tokens=16, enable_chunked_prefill=False), "max_num_batched_tokens"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(enable_chunked_prefill="yes"), "enable_chunked_prefill"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_engine_arguments(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_ckpt("qwen3"), **kwargs)


def test_kv_cache_too_small_fails_at_start(tiny_ckpt):
    with pytest.raises(ValueError, match="num_kvcache_blocks"):
        LLM(tiny_ckpt("qwen3"), kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=4)


def test_unsupported_architecture(tiny_ckpt, tmp_path):
    path = tmp_path / "gpt2ish"
    shutil.copytree(tiny_ckpt("qwen3"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        LLM(str(path))
    with pytest.raises(ValueError, match="not a local path"):
        LLM(os.path.join(str(tmp_path), "missing"))


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256, 512])
def test_every_block_size_generates_the_same(tiny_ckpt, block_size):
    prompts = [[3 + i for i in range(n)] for n in (1, 40, 200)]
    with LLM(tiny_ckpt("llama"), kvcache_block_size=16, max_model_len=512) as ref_llm:
        ref = [o["token_ids"] for o in ref_llm.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(tiny_ckpt("llama"), kvcache_block_size=block_size, max_model_len=512, max_num_seqs=4) as llm:
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        LLM("some-org/some-model-that-is-not-here")
