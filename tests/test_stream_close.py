"""``LLM.stream()`` closed or garbage-collected before (or after) its first item aborts its request:
nothing stays queued, every block comes back, and the engine gives the same tokens afterwards."""

import gc

import pytest

from nanovllm import LLM, SamplingParams
from tests.faults import check_clean, greedy_tokens

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT, OTHER = list(range(5, 45)), list(range(50, 80))


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    with LLM(tiny_ckpt("qwen3"), kvcache_block_size=16, max_model_len=256, max_num_seqs=8) as llm:
        yield llm


@pytest.fixture(scope="module")
def expected(llm):
    return greedy_tokens(llm, [PROMPT, OTHER], GREEDY)


def test_close_before_first_next_aborts(llm, expected):
    stream = llm.stream(PROMPT, GREEDY)
    assert llm.engine.has_unfinished_requests()  # queued by the call itself
    stream.close()
    check_clean(llm)
    assert list(stream) == []  # a closed stream is exhausted
    assert greedy_tokens(llm, [PROMPT, OTHER], GREEDY) == expected


def test_garbage_collected_before_first_next_aborts(llm, expected):
    llm.stream(PROMPT, GREEDY)  # dropped at once
    gc.collect()
    check_clean(llm)
    assert greedy_tokens(llm, [OTHER], GREEDY) == expected[1:]


def test_close_mid_stream_aborts_and_full_read_matches_generate(llm, expected):
    stream = llm.stream(PROMPT, GREEDY)
    first = next(stream)
    assert first["token_ids"] and not first["finished"]
    stream.close()
    check_clean(llm)
    pieces = list(llm.stream(PROMPT, GREEDY))
    assert [t for p in pieces for t in p["token_ids"]] == expected[0]
    assert pieces[-1]["finished"] and pieces[-1]["finish_reason"] == "length"
    check_clean(llm)


def test_stream_collected_during_a_step_is_aborted_after_it(llm, expected):
    """The cyclic collector may free an abandoned stream in the middle of another call's step, on
    the thread that holds the engine: the abort waits for the step to end, and nothing breaks."""

    class Cycle:
        pass

    holder = Cycle()
    holder.self, holder.stream = holder, llm.stream(PROMPT, GREEDY)  # freed only by gc.collect()
    del holder
    calls = []

    def collect_once(*_):
        if not calls:
            calls.append(gc.collect())

    hook = llm.engine.executor.model.model.layers[0].register_forward_pre_hook(collect_once)
    try:
        got = greedy_tokens(llm, [OTHER], GREEDY)
    finally:
        hook.remove()
    assert calls, "the hook never ran"
    assert got == expected[1:]  # the abandoned prompt shared the first steps, and then left
    check_clean(llm)
