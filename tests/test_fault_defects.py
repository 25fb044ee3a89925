"""One test per numbered defect of issue 15 (2 and 4 are in test_loader.py and
test_sampling_params.py), each reproducing the issue's own repro on a tiny checkpoint."""

import random
import threading

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.faults import check_clean, greedy_tokens, run_with_timeout

ENGINE = dict(kvcache_block_size=16, max_model_len=256, max_num_seqs=8)
CHUNKED = dict(ENGINE, max_num_batched_tokens=32)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
_rng = random.Random(1)
P60, P90, P120 = ([_rng.randrange(3, 384) for _ in range(n)] for n in (60, 90, 120))


@pytest.fixture(scope="module")
def fresh(tiny_ckpt):
    """Greedy tokens of never-faulted engines: (engine args as a tuple, prompt) -> tokens."""
    cache: dict = {}

    def get(args: dict, prompt: list[int]) -> list[int]:
        key = (tuple(sorted(args.items())), tuple(prompt))
        if key not in cache:
            with LLM(tiny_ckpt("qwen3"), **args) as llm:
                cache[key] = greedy_tokens(llm, [prompt], GREEDY)[0]
        return cache[key]

    return get


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    with LLM(tiny_ckpt("qwen3"), **ENGINE) as llm:
        yield llm


# ---- 1. an exception or Ctrl-C during a prefill poisons the prefix cache --------------------------


class _Raiser:
    """A forward pre-hook that raises ``exc`` at the ``at``-th forward of its layer (1-based)."""

    def __init__(self, exc: type[BaseException], at: int = 1):
        self.exc, self.at, self.calls = exc, at, 0

    def __call__(self, *_):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc("injected in the forward")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize(
    "args, at",
    [(ENGINE, 1), (CHUNKED, 1), (CHUNKED, 2)],
    ids=["whole-prefill", "chunked-first-chunk", "chunked-second-chunk"],
)
def test_1_fault_in_prefill_does_not_poison_prefix_cache(tiny_ckpt, fresh, args, at, exc):
    """The issue's repro: a pre-hook on a decoder layer raises during a 60-token prefill; the same
    prompt afterwards gives a fresh engine's tokens, every time. At chunk 2 the first chunk's two
    full blocks were computed (and may be cached); the third was half-written."""
    with LLM(tiny_ckpt("qwen3"), **args) as llm:
        hook = llm.engine.executor.model.model.layers[1].register_forward_pre_hook(_Raiser(exc, at))
        with pytest.raises(exc, match="injected"):
            llm.generate([P60], GREEDY, use_tqdm=False)
        hook.remove()
        check_clean(llm)
        first = greedy_tokens(llm, [P60], GREEDY)[0]
        second = llm.generate([P60], GREEDY, use_tqdm=False)[0]
        check_clean(llm)
    assert first == second["token_ids"] == fresh(args, P60)
    assert second["num_cached_tokens"] == 48  # the repeat did read the cache


def test_1_abort_between_chunks_does_not_poison_prefix_cache(tiny_ckpt, fresh):
    """A client that goes away between two chunks of its prefill (engine.abort_request)."""
    with LLM(tiny_ckpt("qwen3"), **CHUNKED) as llm:
        engine = llm.engine
        engine.add_request("gone", P90, GREEDY)
        assert engine.step() == []  # the first 32-token chunk: no token yet
        engine.abort_request("gone")
        (out,) = engine.step()  # the abort's final output, so a waiting caller stops waiting
        assert (out.request_id, out.finished, out.outputs[0].finish_reason) == ("gone", True, "abort")
        check_clean(llm)
        again = llm.generate([P90], GREEDY, use_tqdm=False)[0]
        check_clean(llm)
    assert again["token_ids"] == fresh(CHUNKED, P90)
    assert again["num_cached_tokens"] == 32  # the aborted request's finished chunk was reused


# ---- 3. stream() spins forever when another caller's step finishes its request -----------------


def test_3_half_read_stream_then_generate_then_rest_of_stream(llm, fresh):
    def scenario():
        stream = llm.stream(P60, GREEDY)
        first = next(stream)
        other = greedy_tokens(llm, [P90], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
        rest = list(stream)
        return [t for piece in [first, *rest] for t in piece["token_ids"]], rest[-1], other

    tokens, last, other = run_with_timeout(scenario, timeout=60)
    assert tokens == fresh(ENGINE, P60)
    assert last["finished"] and last["finish_reason"] == "length"
    assert other[:16] == fresh(ENGINE, P90)
    check_clean(llm)


def test_3_two_interleaved_streams_both_complete(llm, fresh):
    def scenario():
        streams = {0: llm.stream(P60, GREEDY), 1: llm.stream(P120, GREEDY)}
        got: dict[int, list[int]] = {0: [], 1: []}
        while streams:
            for k in list(streams):
                piece = next(streams[k], None)
                if piece is None:
                    del streams[k]
                else:
                    got[k] += piece["token_ids"]
        return got

    got = run_with_timeout(scenario, timeout=60)
    assert got == {0: fresh(ENGINE, P60), 1: fresh(ENGINE, P120)}
    check_clean(llm)


@pytest.mark.parametrize("call", ["generate", "stream"])
def test_3_params_changed_after_construction_raise_instead_of_hanging(llm, call):
    sp = SamplingParams(temperature=0, max_tokens=4)
    sp.n = 0
    fn = (
        (lambda: llm.generate([P60], sp, use_tqdm=False))
        if call == "generate"
        else (lambda: llm.stream(P60, sp))
    )
    with pytest.raises(ValueError, match="n"):
        run_with_timeout(fn, timeout=30)
    check_clean(llm)
    assert len(greedy_tokens(llm, [P60[:5]], SamplingParams(max_tokens=3, ignore_eos=True))[0]) == 3


# ---- 5. all-or-nothing validation, a shut-down engine, wrong prompt types, threads -----------------


def test_5_a_bad_parameter_queues_nothing(llm):
    a, b, c = P60[:20], P60[20:40], P90[:30]
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([a, b], [SamplingParams(), None], use_tqdm=False)
    check_clean(llm)
    before = llm.engine.num_prompt_tokens
    (out,) = llm.generate([c], GREEDY, use_tqdm=False)
    assert llm.engine.num_prompt_tokens - before == len(c) - out["num_cached_tokens"]  # `a` never ran


def test_5_after_shutdown_every_call_raises_at_the_call(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), **ENGINE)
    llm.shutdown()
    for call in (
        lambda: llm.generate([P60], GREEDY),
        lambda: llm.chat([{"role": "user", "content": "hi"}], GREEDY),
        lambda: llm.stream(P60, GREEDY),  # at the call, before any next()
    ):
        with pytest.raises(RuntimeError, match="the engine has been shut down"):
            call()
    llm.shutdown()  # idempotent


@pytest.mark.parametrize(
    "prompts",
    [None, 5, b"hello", {"prompt": "hi"}, np.array([5, 6, 7]), [[5, 6], None], [b"x"], [[5, 6.0]]],
    ids=["None", "int", "bytes", "dict", "ndarray", "None-in-list", "bytes-in-list", "float-id"],
)
def test_5_wrong_prompt_types_name_what_is_accepted(llm, prompts):
    with pytest.raises(TypeError, match=r"str.*list of int token ids"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    check_clean(llm)


def test_5_numpy_and_torch_integer_token_ids_work(llm):
    plain = greedy_tokens(llm, [P60], GREEDY)[0]
    as_numpy = [np.int64(t) if i % 2 else np.int32(t) for i, t in enumerate(P60)]
    assert greedy_tokens(llm, [as_numpy], GREEDY)[0] == plain
    assert greedy_tokens(llm, [[torch.tensor(t) for t in P60]], GREEDY)[0] == plain
    assert greedy_tokens(llm, [np.array(P60).tolist()], GREEDY)[0] == plain


def test_5_two_threads_calling_generate_get_their_own_results(llm, fresh):
    results: dict[int, list[list[int]]] = {}
    start = threading.Barrier(2)

    def worker(k: int, prompts: list[list[int]]) -> None:
        start.wait()
        for _ in range(2):
            results.setdefault(k, []).extend(greedy_tokens(llm, prompts, GREEDY))

    threads = [
        threading.Thread(target=worker, args=(0, [P60, P120])),
        threading.Thread(target=worker, args=(1, [P90])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert results[0] == [fresh(ENGINE, P60), fresh(ENGINE, P120)] * 2
    assert results[1] == [fresh(ENGINE, P90)] * 2
    check_clean(llm)
