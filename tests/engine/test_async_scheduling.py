"""Async scheduling (step N+1 scheduled before step N's tokens are known) gives exactly the outputs
of the synchronous loop: against a scripted runner over random workloads, and with a real model."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from tests.engine.fake_runner import FakeRunner

NUM_BLOCKS, BLOCK = 24, 16


def run(ckpt: str, requests, async_scheduling: bool, abort_at: dict[int, list[int]]) -> dict:
    """Drive an engine over ``requests`` = [(arrival step, prompt, params)]; return each request's
    final token ids and finish reasons, checking the block manager after every step."""
    config = Config.from_kwargs(
        ckpt,
        kvcache_block_size=BLOCK,
        max_model_len=256,
        num_kvcache_blocks=NUM_BLOCKS,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        async_scheduling=async_scheduling,
    )
    runner = FakeRunner(NUM_BLOCKS, BLOCK, vocab=config.hf_config.vocab_size)
    engine = LLMEngine(config, executor=runner)
    results, step = {}, 0
    while step < 400:
        for i, (at, prompt, params) in enumerate(requests):
            if at == step:
                engine.add_request(str(i), prompt, params)
        for i in abort_at.get(step, []):
            engine.abort_request(str(i))
        for out in engine.step():
            results[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
        sched = engine.scheduler
        sched.block_manager.check_integrity(sched.running)
        step += 1
        if len(results) == len(requests) and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    engine.step()  # the last step in flight (if any) is collected and dropped
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS
    engine.shutdown()
    return results


prompt_st = st.lists(st.sampled_from([5, 6, 7, 8]), min_size=1, max_size=3).map(
    lambda parts: [t for p in parts for t in [p] * 20]  # shared 20-token runs: prefix-cache hits
)
params_st = st.builds(
    lambda max_tokens, n, stop, min_tokens: SamplingParams(
        temperature=0, max_tokens=max_tokens, n=n, stop_token_ids=stop, min_tokens=min(min_tokens, max_tokens)
    ),
    max_tokens=st.integers(1, 40),
    n=st.sampled_from([1, 1, 2]),
    stop=st.lists(st.integers(0, 99), max_size=3),
    min_tokens=st.integers(0, 4),
)
workload_st = st.lists(st.tuples(st.integers(0, 12), prompt_st, params_st), min_size=1, max_size=7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=workload_st, abort=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 6)), max_size=2))
def test_async_outputs_equal_sync_outputs(tiny_ckpt, requests, abort):
    """Random arrivals, prefix sharing, n > 1, stop tokens, min_tokens, preemption (24 blocks of
    16 for up to 4 sequences of up to 100 tokens) and aborts: same tokens, same finish reasons
    (an aborted request has a prefix of its tokens: async mode learns them a step later)."""
    abort_at: dict[int, list[int]] = {}
    for at, i in abort:
        if i < len(requests):
            abort_at.setdefault(max(at, requests[i][0]), []).append(i)
    ckpt = tiny_ckpt("qwen3")
    got, want = run(ckpt, requests, True, abort_at), run(ckpt, requests, False, abort_at)
    aborted = {str(i) for ids in abort_at.values() for i in ids}
    for request_id in want:
        if request_id not in aborted:
            assert got[request_id] == want[request_id]
        else:  # the abort lands one step later in the async loop's view: it has at most as many tokens
            for (a, _), (s, _) in zip(got[request_id], want[request_id], strict=True):
                assert a == s[: len(a)]


def test_async_step_runs_one_step_ahead(tiny_ckpt):
    """The step launched first returns nothing; each later call returns the previous step's tokens,
    and the extra token computed for a finished sequence is never returned."""
    config = Config.from_kwargs(
        tiny_ckpt("qwen3"), kvcache_block_size=BLOCK, num_kvcache_blocks=NUM_BLOCKS, async_scheduling=True
    )
    runner = FakeRunner(NUM_BLOCKS, BLOCK, vocab=config.hf_config.vocab_size)
    engine = LLMEngine(config, executor=runner)
    engine.add_request(
        "a", [5] * 10, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), stream=True
    )
    seen = []
    for _ in range(6):
        seen.append([len(o.outputs[0].new_token_ids) for o in engine.step()])
    assert seen[0] == []  # step 1 (the prefill) is in flight
    assert seen[1:4] == [[1], [1], [1]]
    assert len(runner.steps) == 4  # the prefill, two decodes, and one decode past the end (dropped)
    assert engine.scheduler.block_manager.num_free_blocks == NUM_BLOCKS


def test_failed_step_in_flight_leaves_no_trace(tiny_ckpt):
    config = Config.from_kwargs(
        tiny_ckpt("qwen3"), kvcache_block_size=BLOCK, num_kvcache_blocks=NUM_BLOCKS, async_scheduling=True
    )
    runner = FakeRunner(NUM_BLOCKS, BLOCK, vocab=config.hf_config.vocab_size)
    engine = LLMEngine(config, executor=runner)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("a", [5] * 40, params)
    engine.step()
    engine.step()
    runner.fail_next = RuntimeError("injected")
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    reference = LLMEngine(
        Config.from_kwargs(tiny_ckpt("qwen3"), kvcache_block_size=BLOCK, num_kvcache_blocks=NUM_BLOCKS),
        executor=FakeRunner(NUM_BLOCKS, BLOCK, vocab=config.hf_config.vocab_size),
    )
    reference.add_request("a", [5] * 40, params)
    ref = []
    while reference.has_unfinished_requests():
        ref += reference.step()
    assert outs[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


CASES = {
    "greedy": dict(temperature=0, max_tokens=16, ignore_eos=True),
    "seeded n=2": dict(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=16, ignore_eos=True),
    "logprobs": dict(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True),
    "penalties": dict(temperature=0, max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5),
    "min_tokens + stop ids": dict(
        temperature=0.8, seed=3, max_tokens=20, min_tokens=5, stop_token_ids=[1, 2, 3]
    ),
}


@pytest.mark.slow
def test_real_model_async_equals_sync(tiny_ckpt):
    """Nine blocks of 16 for six prompts of 8-48 tokens: the sequences preempt each other."""
    num_blocks = 9
    prompts = [[5 + i, 17, 42, 99, 7, 250, 31, 8] * (1 + i) for i in range(6)]
    out = {}
    for mode in (True, False):
        with LLM(
            tiny_ckpt("qwen3"),
            kvcache_block_size=16,
            max_model_len=128,
            num_kvcache_blocks=num_blocks,
            max_num_batched_tokens=48,
            async_scheduling=mode,
        ) as llm:
            assert llm.engine.async_scheduling is mode
            out[mode] = {
                name: llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)
                for name, kw in CASES.items()
            }
    for name in CASES:
        for a, s in zip(out[True][name], out[False][name], strict=True):
            for ca, cs in zip(a["outputs"], s["outputs"], strict=True):
                assert (ca["token_ids"], ca["text"], ca["finish_reason"]) == (
                    cs["token_ids"],
                    cs["text"],
                    cs["finish_reason"],
                ), name
                # Batches differ between the loops (a finished sequence holds its place one step
                # longer), and a CPU matmul's rounding may differ with the batch: logprobs to 1e-4.
                for la, ls in zip(ca["logprobs"] or [], cs["logprobs"] or [], strict=True):
                    assert la.keys() == ls.keys()
                    assert all(abs(la[t] - ls[t]) < 1e-4 for t in la), name
