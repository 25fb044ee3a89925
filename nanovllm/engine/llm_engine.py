"""The engine loop: requests in, one scheduler step and one model step at a time, outputs out."""

import atexit
import logging
import time
from dataclasses import dataclass, field

from nanovllm.config import Config
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm")


@dataclass
class StepStats:
    is_prefill: bool
    num_tokens: int  # prompt tokens computed (prefill) or tokens generated (decode)
    seconds: float


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: Config):
        from nanovllm.engine.parallel import make_model_runner

        self.config = config
        self.tokenizer = self._load_tokenizer()
        self.model_runner = make_model_runner(config)  # ModelRunner, or one per rank
        self.eos_token_ids = self._eos_token_ids()
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            num_blocks=self.model_runner.num_blocks,
            block_size=config.kvcache_block_size,
            eos_token_ids=self.eos_token_ids,
        )
        self.requests: dict[int, Sequence] = {}
        self._closed = False
        atexit.register(self.shutdown)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.config.model)

    def _eos_token_ids(self) -> set[int]:
        ids = self.config.eos_token_id
        eos = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if not eos and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        return eos

    # ---- requests ------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, token_ids: list[int], where: str = "prompt") -> None:
        """Raise ValueError (naming the problem and the fix) for a prompt the engine cannot serve."""
        if not token_ids:
            raise ValueError(f"{where} is empty; give at least one token")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(
                f"{where} has {len(token_ids)} tokens, more than max_model_len={self.config.max_model_len}; "
                "shorten it or raise max_model_len"
            )

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        token_ids = self.tokenize(prompt)
        self.validate(token_ids)
        seq = Sequence(token_ids, sampling_params, self.config.kvcache_block_size)
        self.requests[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def abort_request(self, request_id: int) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return not self.scheduler.is_finished()

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        """Schedule, run the model once, append the sampled tokens; report every request that
        got a token this step (finished ones are forgotten by the engine afterwards)."""
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return [], StepStats(sched.is_prefill, 0, 0.0)
        token_ids = self.model_runner.run(sched.seqs, sched.is_prefill)
        self.scheduler.update(sched, token_ids)
        outputs = []
        for seq, token_id in zip(sched.seqs, token_ids):
            outputs.append(
                RequestOutput(
                    request_id=seq.seq_id,
                    prompt_token_ids=seq.prompt_token_ids,
                    token_ids=seq.completion_token_ids,
                    finished=seq.is_finished,
                    finish_reason=seq.finish_reason,
                    num_cached_tokens=seq.num_prompt_cached_tokens or 0,
                    new_token_ids=[token_id],
                )
            )
            if seq.is_finished:
                self.requests.pop(seq.seq_id, None)
        return outputs, StepStats(sched.is_prefill, sched.num_batched_tokens, time.perf_counter() - start)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self.model_runner.shutdown()
