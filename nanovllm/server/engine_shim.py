"""THROWAWAY: today's ``LLMEngine`` behind the Engine API v2 spec, until that API lands on main.

The server is written against v2: string request ids, ``step()`` returning outputs only,
``stats()``. This adapter is the only place that knows the old API; delete it (and its one import
in ``cli.py``) when main has the commit "Engine API v2".
"""

from dataclasses import dataclass

from nanovllm.config import Config
from nanovllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    new_token_ids: list[int]
    text_delta: str
    new_logprobs: list[dict[int, float]] | None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int


class EngineShim:
    def __init__(self, config: Config):
        from nanovllm.engine.llm_engine import LLMEngine

        self._engine = LLMEngine(config)
        self.config = self._engine.config
        self.tokenizer = self._engine.tokenizer
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, stream: bool = False
    ) -> None:
        if request_id in self._ids:
            raise ValueError(f"request id {request_id!r} is already in use; give each request its own id")
        rid = self._engine.add_request(prompt, params, stream=stream)
        self._ids[request_id], self._names[rid] = rid, request_id
        self._num_prompt_tokens += len(self._engine.requests[rid].prompt_token_ids)

    def step(self) -> list:
        outputs, _ = self._engine.step()
        result = []
        for out in outputs:
            name = self._names[out.request_id]
            self._num_generation_tokens += sum(len(c.new_token_ids) for c in out.outputs)
            if out.finished:
                del self._names[out.request_id], self._ids[name]
            result.append(
                RequestOutput(
                    name,
                    out.prompt_token_ids,
                    [self._completion(c, out.finished) for c in out.outputs],
                    out.finished,
                    out.num_cached_tokens,
                )
            )
        return result

    @staticmethod
    def _completion(c, finished: bool) -> CompletionOutput:
        """Cumulative fields only at the end (as v2 does): copying them every step is quadratic."""
        seq_logprobs = c._seq.logprobs if c._with_logprobs else None
        new = None if seq_logprobs is None else seq_logprobs[len(seq_logprobs) - len(c.new_token_ids) :]
        return CompletionOutput(
            c.index,
            c.text if finished else "",
            list(c.token_ids) if finished else [],
            c.finish_reason,
            list(seq_logprobs) if finished and seq_logprobs is not None else None,
            list(c.new_token_ids),
            c.text_delta,
            new,
        )

    def abort_request(self, request_id: str) -> None:
        rid = self._ids.pop(request_id, None)
        if rid is not None:
            del self._names[rid]
            self._engine.abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return self._engine.has_unfinished_requests()

    def stats(self) -> EngineStats:
        scheduler = self._engine.scheduler
        blocks = scheduler.block_manager
        total = len(blocks.blocks)
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=(total - blocks.num_free_blocks) / total,
            num_preemptions=scheduler.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )

    def shutdown(self) -> None:
        self._engine.shutdown()
