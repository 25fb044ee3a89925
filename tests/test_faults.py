"""Issue 15's fault-injection suite: a failure at every stage of a step (scheduling, input
preparation, the first and the last decoder layer, sampling, output processing, detokenization), as
an exception and as KeyboardInterrupt, in a prefill step, a decode step and a mixed chunked step.

After each: the error reaches the caller, no block leaks, no request is left behind, and the same
prompts on the same LLM give the tokens a never-faulted LLM gives (the prefix cache holds nothing
that a failed step half-wrote). A stream in flight from another caller still gets all of its tokens.

Each test has prompts of its own: with prompts shared, the prefix cache would turn a later test's
chunked prefill into one short step, and the step kind it wants to fail would never come.
"""

import random

import pytest

from nanovllm import LLM, SamplingParams
from tests.faults import NEVER, PHASES, STAGES, Injected, check_clean, greedy_tokens, inject, run_with_timeout

ENGINE = dict(kvcache_block_size=16, max_model_len=256, max_num_seqs=8)
CONFIGS = {  # "whole": every prompt prefilled in one step; "chunked": 32-token steps mix chunks and decodes
    "whole": dict(max_num_batched_tokens=1024),
    "chunked": dict(max_num_batched_tokens=32),
}
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[NEVER])


def prompts_for(*key) -> list[list[int]]:
    rng = random.Random(repr(key))
    return [[rng.randrange(3, 384) for _ in range(n)] for n in (60, 100, 150)]


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    """config name -> (an LLM the faults hit, a reference LLM of that config that no fault hits)."""
    cache: dict[str, tuple[LLM, LLM]] = {}

    def get(name: str) -> tuple[LLM, LLM]:
        if name not in cache:
            args = dict(ENGINE, **CONFIGS[name])
            cache[name] = LLM(tiny_ckpt("qwen3"), **args), LLM(tiny_ckpt("qwen3"), **args)
        return cache[name]

    yield get
    for pair in cache.values():
        for llm in pair:
            llm.shutdown()


def config_for(phase: str) -> str:
    return "chunked" if phase == "mixed" else "whole"


CASES = [(stage, phase, exc) for stage in STAGES for phase in PHASES for exc in (Injected, KeyboardInterrupt)]


@pytest.mark.parametrize("stage, phase, exc", CASES, ids=[f"{s}-{p}-{e.__name__}" for s, p, e in CASES])
def test_fault_leaves_engine_as_if_the_call_never_ran(engines, stage, phase, exc):
    llm, ref_llm = engines(config_for(phase))
    prompts = prompts_for(stage, phase, exc.__name__)
    with inject(llm, stage, phase, exc) as fault, pytest.raises(exc, match="injected fault"):
        llm.generate(prompts, PARAMS, use_tqdm=False)
    assert fault.fired
    check_clean(llm)
    assert greedy_tokens(llm, prompts, PARAMS) == greedy_tokens(ref_llm, prompts, PARAMS)
    check_clean(llm)


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt], ids=["error", "interrupt"])
@pytest.mark.parametrize("stream_tokens", [2, 8], ids=["stream-finishes-in-fault-step", "stream-goes-on"])
@pytest.mark.parametrize("stage", STAGES)
def test_stream_of_another_caller_survives_a_fault(engines, stage, stream_tokens, exc):
    """A stream has its first token; a generate's first step (the stream's next decode plus the new
    prompt's first chunk) fails. The generate raises; the stream still yields every token."""
    llm, ref_llm = engines("chunked")
    mine, other = prompts_for("stream", stage, exc.__name__, stream_tokens)[:2]
    sp = SamplingParams(temperature=0, max_tokens=stream_tokens, ignore_eos=True)
    expected = greedy_tokens(ref_llm, [mine], sp)[0]
    stream = llm.stream(mine, sp)
    first = next(stream)
    with inject(llm, stage, "mixed", exc) as fault, pytest.raises(exc, match="injected fault"):
        llm.generate([other], PARAMS, use_tqdm=False)
    assert fault.fired
    llm.engine.scheduler.block_manager.check_integrity(llm.engine.scheduler.running)
    rest = run_with_timeout(lambda: list(stream), timeout=60)
    pieces = [first, *rest]
    assert [t for p in pieces for t in p["token_ids"]] == expected
    assert pieces[-1]["finished"] and pieces[-1]["finish_reason"] == "length"
    check_clean(llm)
