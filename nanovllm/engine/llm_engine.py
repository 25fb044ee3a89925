"""The engine loop: requests in, one scheduler step and one model step at a time, outputs out.

A request with ``n > 1`` becomes n sequences that share the prompt (and, through prefix caching,
its full KV blocks). Stop strings and text deltas come from incremental detokenization, done only
for requests that need it (a stop string, or streaming); other texts are decoded once at the end.
"""

import atexit
import json
import logging
import os
import time
from dataclasses import dataclass, replace

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm")


@dataclass
class StepStats:
    is_prefill: bool
    num_tokens: int  # prompt tokens computed (prefill) or tokens generated (decode)
    seconds: float


class CompletionOutput:
    """One of a request's n completions. ``token_ids``, ``finish_reason`` and ``logprobs`` read the
    live sequence, so building one per sequence per step costs nothing until they are read."""

    __slots__ = ("index", "text", "new_token_ids", "text_delta", "_seq", "_with_logprobs")

    def __init__(self, index: int, seq: Sequence, text: str, with_logprobs: bool):
        self.index, self._seq, self.text, self._with_logprobs = index, seq, text, with_logprobs
        self.new_token_ids: list[int] = []  # this step's tokens
        self.text_delta = ""  # this step's text (streaming requests only)

    @property
    def token_ids(self) -> list[int]:
        return self._seq.completion_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self._seq.finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return list(self._seq.logprobs) if self._with_logprobs else None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass
class _Request:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    texts: list[str]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: Config):
        from nanovllm.engine.parallel import make_model_runner

        self.config = config
        self.tokenizer = self._load_tokenizer()
        self.model_runner = make_model_runner(config)  # ModelRunner, or one per rank
        self.eos_token_ids = self._eos_token_ids()
        self.model_runner.eos_token_ids = sorted(self.eos_token_ids)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            num_blocks=self.model_runner.num_blocks,
            block_size=config.kvcache_block_size,
            eos_token_ids=self.eos_token_ids,
        )
        self.requests: dict[int, _Request] = {}
        self._seq_to_request: dict[int, _Request] = {}
        self._next_request_id = 0
        self._closed = False
        atexit.register(self.shutdown)

    def _load_tokenizer(self):
        if self.config.skip_tokenizer_init:
            return None
        if self.config.is_gguf:
            from nanovllm.utils.gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(self.config.model)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.config.model)

    def _eos_token_ids(self) -> set[int]:
        """EOS ids from config.json, generation_config.json (as HF generate uses), else the tokenizer."""
        eos: set[int] = set()
        ids = [self.config.eos_token_id]
        gen_path = os.path.join(self.config.model, "generation_config.json")
        if os.path.isdir(self.config.model) and os.path.isfile(gen_path):
            with open(gen_path) as f:
                ids.append(json.load(f).get("eos_token_id"))
        for i in ids:
            eos.update(i if isinstance(i, list) else [] if i is None else [i])
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        return eos

    # ---- requests ------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or drop skip_tokenizer_init")
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

    def add_request(
        self, prompt: str | list[int], sampling_params: SamplingParams, stream: bool = False
    ) -> int:
        """Queue a request; returns its id. ``stream=True`` fills ``text_delta`` at every step."""
        sampling_params.validate()  # again: a field may have been changed since construction
        token_ids = self.tokenize(prompt)
        self.validate(token_ids)
        params = sampling_params
        seqs = []
        for i in range(params.n):
            child = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            seqs.append(Sequence(token_ids, child, self.config.kvcache_block_size))
        incremental = self.tokenizer is not None and (stream or bool(params.stop))
        request = _Request(
            request_id=self._next_request_id,
            prompt_token_ids=token_ids,
            params=params,
            seqs=seqs,
            detokenizers=[
                IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if incremental else None
                for _ in seqs
            ],
            texts=[""] * len(seqs),
        )
        self._next_request_id += 1
        self.requests[request.request_id] = request
        for seq in seqs:
            self._seq_to_request[seq.seq_id] = request
            self.scheduler.add(seq)
        return request.request_id

    def abort_request(self, request_id: int) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            self._seq_to_request.pop(seq.seq_id, None)
            if not seq.is_finished:
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
        token_ids, logprobs = self.model_runner.run(sched.seqs, sched.is_prefill)
        if logprobs is not None:
            for seq, lp in zip(sched.seqs, logprobs, strict=True):
                if lp is not None:
                    seq.logprobs.append(lp)
        self.scheduler.update(sched, token_ids)
        touched: dict[int, tuple[_Request, dict[int, CompletionOutput]]] = {}
        for seq, token_id in zip(sched.seqs, token_ids, strict=True):
            request = self._seq_to_request[seq.seq_id]
            index = request.seqs.index(seq)
            delta = self._detokenize(request, index, seq)
            out = self._completion(request, index)
            out.new_token_ids, out.text_delta = [token_id], delta
            touched.setdefault(request.request_id, (request, {}))[1][index] = out
        outputs = []
        for request, fresh in touched.values():
            finished = request.finished
            completions = [fresh.get(i) or self._completion(request, i) for i in range(len(request.seqs))]
            if finished:
                for i, c in enumerate(completions):
                    c.text = request.texts[i] = self._final_text(request, i)
                self.requests.pop(request.request_id, None)
                for seq in request.seqs:
                    self._seq_to_request.pop(seq.seq_id, None)
            outputs.append(
                RequestOutput(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    outputs=completions,
                    finished=finished,
                    num_cached_tokens=request.seqs[0].num_prompt_cached_tokens or 0,
                )
            )
        return outputs, StepStats(sched.is_prefill, sched.num_batched_tokens, time.perf_counter() - start)

    def _completion(self, request: _Request, i: int) -> CompletionOutput:
        return CompletionOutput(i, request.seqs[i], request.texts[i], request.params.logprobs is not None)

    def _detokenize(self, request: _Request, i: int, seq: Sequence) -> str:
        """Advance incremental detokenization; finish ``seq`` on a stop string. Returns the delta."""
        detok = request.detokenizers[i]
        if detok is None:
            return ""
        tokens = seq.completion_token_ids
        before = len(detok.text)
        detok.step(tokens)
        if seq.is_finished:
            detok.flush(tokens)
        params = request.params
        if params.stop and seq.num_completion_tokens >= params.min_tokens:
            start = max(0, before - max(len(s) for s in params.stop) + 1)
            for stop in params.stop:
                at = detok.text.find(stop, start)
                if at != -1:
                    detok.text = detok.text[: at + len(stop) if params.include_stop_str_in_output else at]
                    if not seq.is_finished:
                        self.scheduler.finish(seq, "stop")
                    seq.finish_reason = "stop"
                    break
        request.texts[i] = detok.text
        return detok.text[before:] if len(detok.text) > before else ""

    def _final_text(self, request: _Request, i: int) -> str:
        if request.detokenizers[i] is not None:
            return request.texts[i]
        if self.tokenizer is None:
            return ""
        ids = request.seqs[i].completion_token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=request.params.skip_special_tokens)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self.model_runner.shutdown()
