"""The server's engine thread with a scripted runner: a step that raises fails only its requests."""

import asyncio

import pytest

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineStepError
from tests.engine.fake_runner import FakeRunner


async def collect(stream) -> list[int]:
    tokens = []
    while True:
        out = await stream.get()
        tokens += out.outputs[0].new_token_ids or []
        if out.finished:
            return tokens


def test_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_ckpt):
    config = Config.from_kwargs(
        tiny_ckpt("qwen3"), kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=32
    )
    runner = FakeRunner(32, 16)
    engine = LLMEngine(config, executor=runner)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def main():
        server = AsyncEngine(engine)
        server.start(asyncio.get_running_loop())
        try:
            runner.fail_next = RuntimeError("injected")
            doomed = server.add_request("a", [5, 6, 7], params)
            with pytest.raises(EngineStepError, match="injected"):
                await collect(doomed)
            ok = await collect(server.add_request("b", [5, 6, 7], params))
            assert len(ok) == 5 and server.dead is None
        finally:
            await asyncio.to_thread(server.shutdown)

    asyncio.run(main())
    assert engine.scheduler.block_manager.num_free_blocks == 32
