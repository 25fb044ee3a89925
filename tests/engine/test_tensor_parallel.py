"""Tensor parallelism on the CPU (gloo, spawned workers): the same greedy tokens as one rank and as
HF transformers, a clean stop, a clear error when a worker dies, and bad sizes refused up front."""

import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
from multiprocessing.shared_memory import SharedMemory
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from nanovllm import LLM, SamplingParams
from nanovllm.config import check_tensor_parallel
from tests.tiny import hf_greedy, hf_model

MAX_NEW = 16
ENGINE = dict(kvcache_block_size=16, max_model_len=256, dtype="float32")  # HF's float32 is the reference
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)


def prompts(n: int = 6) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, 384) for _ in range(length)] for length in (1, 7, 16, 17, 40, 90)[:n]]


def generate(llm: LLM, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(ps, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """arch -> (checkpoint path, HF greedy tokens, one-rank greedy tokens)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = tiny_ckpt(arch)
            model = hf_model(path)
            hf = [hf_greedy(model, p, MAX_NEW, eos_token_id=2) for p in prompts()]
            with LLM(path, **ENGINE) as llm:
                one = generate(llm, prompts())
            cache[arch] = path, hf, one
        return cache[arch]

    return get


@pytest.mark.parametrize("arch, tp", [("qwen3", 2), ("llama", 2), ("qwen3", 4)])
def test_greedy_matches_one_rank_and_hf(reference, arch, tp):
    """tp=4 puts the tiny models' 2 KV heads on 4 ranks: each KV head is replicated on two."""
    path, hf, one = reference(arch)
    with LLM(path, tensor_parallel_size=tp, **ENGINE) as llm:
        first = generate(llm, prompts())
        again = generate(llm, prompts())  # prefix-cache hits: workers get only the uncached tails
    assert first == one == hf
    assert again == hf


def test_preemption_under_tensor_parallelism(reference):
    path, hf, _ = reference("qwen3")
    engine = dict(kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=9)
    with LLM(path, tensor_parallel_size=2, **engine) as llm:
        out = generate(llm, prompts())
        assert llm.engine.scheduler.num_preemptions > 0
    assert out == hf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_ends_workers_group_and_shared_memory(reference):
    path, hf, _ = reference("qwen3")
    address = f"tcp://127.0.0.1:{_free_port()}"
    llm = LLM(path, tensor_parallel_size=2, distributed_init_method=address, **ENGINE)
    runner = llm.engine.executor
    procs, shm_name = list(runner.procs), runner.sender.name
    assert generate(llm, prompts(2)) == hf[:2]
    with pytest.raises(RuntimeError, match="process group is already active"):
        LLM(path, **ENGINE)  # its layers would shard over the running engine's group
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert [p.exitcode for p in procs] == [0]  # each worker left by itself, none was killed
    assert not mp.active_children()
    assert not dist.is_initialized()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=shm_name)
    with LLM(path, **ENGINE) as llm:  # a one-rank engine afterwards sees no leftover group
        assert generate(llm, prompts(2)) == hf[:2]


def _kill_and_expect_error(llm: LLM, kill) -> None:
    proc = llm.engine.executor.procs[0]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 died"):
        kill(proc)
        generate(llm, prompts(), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    assert time.monotonic() - start < 20
    with pytest.raises(RuntimeError, match="rank 1"):  # and it stays failed, not hung
        generate(llm, prompts(1))
    llm.shutdown()
    assert not mp.active_children()
    assert not dist.is_initialized()


def test_worker_killed_between_steps_raises_naming_the_rank(reference):
    path, _, _ = reference("qwen3")
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    generate(llm, prompts(1))

    def kill(proc):
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=5)

    _kill_and_expect_error(llm, kill)


def test_worker_killed_mid_run_raises_naming_the_rank(reference):
    path, _, _ = reference("qwen3")
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)

    def kill(proc):
        threading.Timer(0.5, os.kill, (proc.pid, signal.SIGKILL)).start()

    _kill_and_expect_error(llm, kill)


@pytest.mark.parametrize(
    "engine_args, message",
    [
        (dict(tensor_parallel_size=3), "must divide the number of attention heads"),
        (dict(tensor_parallel_size=9), "between 1 and 8"),
        (dict(tensor_parallel_size=0), "integer >= 1"),
        (dict(tensor_parallel_size=2, distributed_init_method="127.0.0.1:1234"), "tcp://host:port"),
    ],
)
def test_invalid_sizes_fail_at_start(tiny_ckpt, engine_args, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_ckpt("qwen3"), **ENGINE, **engine_args)
    assert not mp.active_children()


@pytest.mark.parametrize(
    "heads, kv_heads, inter, tp, message",
    [
        (24, 6, 128, 4, "KV heads"),
        (4, 2, 130, 4, "intermediate_size"),
        (32, 8, 12288, 8, None),
        (32, 4, 12288, 8, None),  # 4 KV heads on 8 ranks: replicated twice
    ],
)
def test_check_tensor_parallel(heads, kv_heads, inter, tp, message):
    hf = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter)
    if message is None:
        check_tensor_parallel(hf, tp)
    else:
        with pytest.raises(ValueError, match=message):
            check_tensor_parallel(hf, tp)


def test_steps_carry_only_what_changed():
    """What every rank receives: a sequence travels whole once, then as deltas (a decode step is
    one token and maybe one block per sequence)."""
    from tests.engine.factories import make_scheduler, make_seq, run_step

    sched = make_scheduler(num_blocks=16)
    seq = make_seq(list(range(100, 140)))
    sched.add(seq)
    first = pickle.loads(pickle.dumps(sched.schedule()))
    assert first.new_seqs[0].token_ids == seq.token_ids and first.new_seqs[0].block_ids == seq.block_table
    sched.update(first, sched.__dict__.setdefault("fake_runner", _runner(sched)).execute_model(first))
    run_step(sched)
    decode = sched.schedule()
    assert not decode.new_seqs and decode.cached_seqs.new_token_ids == [[7]]
    assert decode.cached_seqs.new_block_ids == [[]] and decode.cached_seqs.num_computed_tokens == [41]
    assert len(pickle.dumps(decode)) < 400


def _runner(sched):
    from tests.engine.fake_runner import FakeRunner

    return FakeRunner(sched.block_manager.num_blocks, sched.block_size)


def test_worker_that_raises_is_reported_with_its_traceback(reference):
    path, _, _ = reference("qwen3")
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    runner = llm.engine.executor
    runner.sender.send("no_such_method")  # the worker's getattr raises AttributeError
    with pytest.raises(RuntimeError, match="(?s)worker rank 1 raised.*AttributeError.*no_such_method"):
        runner._wait_replies("ok", timeout=30)
    llm.shutdown()
    assert not mp.active_children()


_ORPHAN_SCRIPT = """
import os, signal, sys
from nanovllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, kvcache_block_size=16, max_model_len=256)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    print(*[p.pid for p in llm.engine.executor.procs], flush=True)
    if sys.argv[2] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif sys.argv[2] == "sigint":
        raise KeyboardInterrupt
    # "exit": no shutdown() call; the interpreter's exit must end the workers
"""


@pytest.mark.parametrize("how", ["exit", "sigint", "sigkill"])
def test_no_worker_outlives_its_parent(tiny_ckpt, tmp_path, how):
    import subprocess
    import sys

    script = tmp_path / "engine.py"
    script.write_text(_ORPHAN_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, str(script), tiny_ckpt("qwen3"), how],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pids = [int(p) for p in out.stdout.split()]
    assert pids, out.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited; only its parent may reap it
    except FileNotFoundError:
        return False
