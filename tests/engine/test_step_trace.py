"""NANOVLLM_STEP_TRACE: one JSON line per step() call, written at shutdown, with the step's tokens."""

import json

from nanovllm import SamplingParams
from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from tests.engine.fake_runner import FakeRunner


def test_step_trace_lines_match_the_steps(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.setenv("NANOVLLM_STEP_TRACE", str(tmp_path / "trace"))
    config = Config.from_kwargs(tiny_ckpt(), kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=16)
    engine = LLMEngine(config, executor=FakeRunner(16, 16, vocab=config.hf_config.vocab_size))
    engine.add_request("a", [5] * 10, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("b", [6] * 7, SamplingParams(max_tokens=2, ignore_eos=True))
    calls = 0
    while engine.has_unfinished_requests():
        engine.step()
        calls += 1
    engine.shutdown()
    (path,) = (tmp_path / "trace").iterdir()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == calls
    assert sum(r["prefill_tokens"] or 0 for r in rows) == 17
    assert sum(r["decode_tokens"] or 0 for r in rows) == (4 - 1) + (
        2 - 1
    )  # the first token comes from prefill
    assert all(r["seconds"] >= 0 for r in rows) and rows == sorted(rows, key=lambda r: r["start"])
