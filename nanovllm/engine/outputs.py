"""What the engine hands back: immutable snapshots, one ``RequestOutput`` per request and step."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's ``n`` completions.

    Cumulative fields (``text``, ``token_ids``, ``logprobs``) are filled when the request finishes;
    the increments (``new_token_ids``, ``text_delta``, ``new_logprobs``) at every output of a
    streamed request.
    """

    index: int
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort", once this completion finished
    logprobs: list[dict[int, float]] | None = None
    new_token_ids: list[int] | None = None
    text_delta: str = ""
    new_logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # all n completions, in index order
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class StepStats:
    num_prefill_tokens: int  # prompt tokens computed in the step
    num_decode_tokens: int  # decodes in the step (one token each)
    seconds: float


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks held by sequences, 0..1
    num_preemptions: int  # since start
    num_prompt_tokens: int  # prompt tokens computed since start
    num_generation_tokens: int  # tokens sampled since start
