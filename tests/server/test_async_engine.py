"""The engine process with a scripted runner: a step that raises fails only its requests, and the
server-side texts equal what the engine itself would have streamed."""

import asyncio

import pytest

from nanovllm.engine.step import SchedulerOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineStepError
from tests.engine.fake_runner import FakeRunner

POISON = 13  # a prompt starting with this token makes the step that first schedules it raise
ENGINE_ARGS = dict(kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=32)


class _PoisonedRunner(FakeRunner):
    def execute_model(self, sched: SchedulerOutput):
        if any(new.token_ids[0] == POISON for new in sched.new_seqs):
            self.fail_next = RuntimeError("injected")
        return super().execute_model(sched)


def poisoned_runner(config) -> FakeRunner:
    """Built in the engine process (module level, so that it pickles)."""
    return _PoisonedRunner(config.num_kvcache_blocks, config.kvcache_block_size)


async def collect(stream) -> tuple[list[int], str]:
    tokens, text = [], ""
    while True:
        out = await stream.get()
        tokens += out.outputs[0].new_token_ids or []
        text += out.outputs[0].text_delta
        if out.finished:
            assert out.outputs[0].token_ids == tokens and out.outputs[0].text == text
            return tokens, text


@pytest.mark.parametrize("in_thread", [False, True], ids=["process", "thread"])
def test_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_ckpt, in_thread):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def main():
        engine = AsyncEngine(
            tiny_ckpt("qwen3"), ENGINE_ARGS, in_thread=in_thread, executor_factory=poisoned_runner
        )
        engine.start(asyncio.get_running_loop())
        try:
            with pytest.raises(EngineStepError, match="injected"):
                await collect(engine.add_request("a", [POISON, 6, 7], params))
            tokens, text = await collect(engine.add_request("b", [5, 6, 7], params))
            assert len(tokens) == 5 and engine.dead is None
            assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
            with pytest.raises(ValueError, match="vocabulary"):  # refused by the engine itself
                await collect(engine.add_request("c", [5, 10**6], params))
            assert engine.stats.kv_cache_usage == 0 and engine.num_waiting == 0
        finally:
            await asyncio.to_thread(engine.shutdown)
        assert engine.pid is None or not engine._worker.is_alive()

    asyncio.run(main())


def refusing_runner(config) -> FakeRunner:
    raise ValueError("max_model_len=128 does not fit; lower it")


def test_start_up_error_in_the_engine_process_keeps_its_type_and_message(tiny_ckpt):
    with pytest.raises(ValueError, match="max_model_len=128 does not fit; lower it"):
        AsyncEngine(tiny_ckpt("qwen3"), ENGINE_ARGS, executor_factory=refusing_runner)
