"""Faults under tensor parallelism (gloo, 2 CPU ranks): a failure on either rank reaches the caller
as a clear error, later calls say the engine cannot go on, shutdown leaves nothing running, never a
hang. And min_tokens holds EOS back alike on one rank, on two, and in HF transformers."""

import json
import multiprocessing as mp
import os
import random
import shutil

import pytest
import torch
import torch.distributed as dist

from nanovllm import LLM, SamplingParams
from nanovllm.engine.parallel import WorkerError
from tests.faults import ExplodesInWorker, greedy_tokens, run_with_timeout
from tests.tiny import hf_model

pytestmark = pytest.mark.slow  # each test starts a worker process
ENGINE = dict(kvcache_block_size=16, max_model_len=256, max_num_seqs=8, dtype="float32")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [random.Random(7).randrange(3, 384) for _ in range(70)]


def _expect_engine_failed(llm: LLM, call, error: type[BaseException], match: str) -> None:
    with pytest.raises(error, match=match):
        run_with_timeout(call, timeout=120)
    with pytest.raises(WorkerError, match="rank"):  # and it stays failed, clearly
        run_with_timeout(lambda: llm.generate([PROMPT[:5]], GREEDY, use_tqdm=False), timeout=60)
    llm.shutdown()
    assert not mp.active_children()
    assert not dist.is_initialized()


def test_worker_that_raises_during_a_step_is_named_on_rank_0(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), tensor_parallel_size=2, **ENGINE)
    assert len(greedy_tokens(llm, [PROMPT], GREEDY)[0]) == 8
    bad = ExplodesInWorker(temperature=0, max_tokens=8, ignore_eos=True)
    _expect_engine_failed(
        llm,
        lambda: llm.generate([PROMPT[:30]], bad, use_tqdm=False),
        WorkerError,
        "(?s)worker rank 1 raised.*injected fault in the tensor-parallel worker",
    )


def test_ctrl_c_in_rank_0_forward_stops_the_engine_cleanly(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), tensor_parallel_size=2, **ENGINE)
    layers = llm.engine.executor.runner.model.model.layers

    def interrupt(*_):
        raise KeyboardInterrupt("injected in rank 0's forward")

    layers[-1].register_forward_pre_hook(interrupt)
    _expect_engine_failed(
        llm, lambda: llm.generate([PROMPT], GREEDY, use_tqdm=False), KeyboardInterrupt, "injected"
    )


def test_min_tokens_holds_eos_back_on_one_and_two_ranks_as_in_hf(tiny_ckpt, tmp_path):
    """A copy of the tiny checkpoint whose EOS is the token most prompts start their answer with,
    so a prompt whose first greedy token is EOS is easy to find, whatever the random weights."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_ckpt("qwen3"), path)
    rng = random.Random(3)
    candidates = [[rng.randrange(3, 384) for _ in range(rng.randrange(4, 24))] for _ in range(64)]
    with LLM(path, **ENGINE) as llm:
        firsts = [t[0] for t in greedy_tokens(llm, candidates, SamplingParams(temperature=0, max_tokens=1))]
    eos = max(set(firsts), key=firsts.count)
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                cfg = json.load(f)
            cfg["eos_token_id"] = eos
            with open(file, "w") as f:
                json.dump(cfg, f)
    prompts = [p for p, first in zip(candidates, firsts, strict=True) if first == eos][:3]
    sp = SamplingParams(temperature=0, min_tokens=3, max_tokens=8)
    with LLM(path, **ENGINE) as llm:
        assert [t[0] for t in greedy_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=1))] == [
            eos
        ] * 3
        one = greedy_tokens(llm, prompts, sp)
    with LLM(path, tensor_parallel_size=2, **ENGINE) as llm:
        two = greedy_tokens(llm, prompts, sp)
    model = hf_model(path)
    with torch.no_grad():
        hf = [
            model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=8,
                min_new_tokens=3,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    assert one == two == hf
    assert all(len(t) >= 3 and eos not in t[:3] for t in one)
