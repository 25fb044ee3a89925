"""The engine: requests in, one scheduler step and one model step at a time, outputs out.

A request with ``n > 1`` becomes n sequences that share the prompt (and, through prefix caching,
its full KV blocks). Stop strings and text deltas come from incremental detokenization, done only
for requests that need it (a stop string, or streaming); other texts are decoded once at the end.

Async scheduling (``async_scheduling``, on by default on a GPU): ``step()`` schedules and launches
step N, and only then waits for step N-1's sampled tokens, so the CPU work of a step (scheduling,
input preparation, output processing) runs while the GPU computes the one before. The runner feeds
step N-1's tokens to step N on the GPU; the scheduler learns them one step later. A sequence that
finished at step N-1 has computed one more token in step N: it is dropped. Requests with penalties
need every earlier token on the host, so while one runs the engine waits for each step first.

The engine is not thread-safe: exactly one caller steps it (``LLM`` in a process, or the server's
engine thread), and each ``RequestOutput`` is handed to whoever owns that request.
"""

import atexit
import json
import logging
import operator
import os
import time
from dataclasses import dataclass, field, replace
from itertools import count

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.outputs import CompletionOutput, EngineStats, RequestOutput, StepStats
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step import ModelRunnerOutput, SchedulerOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm")


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    texts: list[str]
    logprobs: list[list[dict[int, float]]]
    # Streamed requests: completion tokens already handed out, and text not yet handed out.
    num_streamed: list[int] = field(default_factory=list)
    text_deltas: list[str] = field(default_factory=list)
    detokenize: bool = True  # False: texts stay empty unless stop strings need them

    @property
    def finished(self) -> bool:
        for s in self.seqs:  # (a loop, not all(...): this runs for every streamed request, every step)
            if not s.is_finished:
                return False
        return True


class LLMEngine:
    def __init__(self, config: Config, executor=None):
        """``executor`` runs the model (``execute_model(SchedulerOutput) -> ModelRunnerOutput``);
        by default a ``ModelRunner``, or one per rank with tensor parallelism. Tests pass a
        scripted one."""
        self.config = config
        self.tokenizer = self._load_tokenizer()
        if executor is None:
            from nanovllm.engine.parallel import make_executor

            executor = make_executor(config)
        self.executor = executor
        eos = set(config.eos_token_ids)
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            num_blocks=executor.num_blocks,
            block_size=config.kvcache_block_size,
            eos_token_ids=eos,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.async_scheduling = config.async_scheduling
        self._inflight = None  # (SchedulerOutput, the runner's handle) of the step launched last
        self.requests: dict[str, _Request] = {}
        self._need_history: set[str] = set()  # requests whose sampling reads all earlier tokens
        self._seq_owner: dict[int, tuple[_Request, int]] = {}  # seq id -> (request, completion index)
        self._auto_ids = count()
        # Output processing of a step may raise (a detokenizer, Ctrl-C); what it had not finished
        # waits here and is done by the next step, so no token, text or final output is lost.
        self._unprocessed: dict[str, tuple[_Request, set[int]]] = {}  # request id -> completions
        self._ready: list[RequestOutput] = []
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.last_step: StepStats | None = None
        # NANOVLLM_STEP_TRACE=DIR: one line per step() call, written to DIR at shutdown (diagnostics):
        # its start and duration, split into scheduling + launch, waiting for the step before (collect),
        # and the rest (output processing).
        self._trace_dir = os.environ.get("NANOVLLM_STEP_TRACE") or None
        self._trace: list[tuple] = []
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

    # ---- requests ------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: a string, or a list / tuple of integer token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or drop skip_tokenizer_init")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            try:
                return [_token_id(t) for t in prompt]
            except TypeError:
                pass
        raise TypeError(
            f"a prompt must be a str or a list of int token ids, got {_describe(prompt)}; "
            "convert arrays with .tolist()"
        )

    def validate(self, token_ids: list[int], where: str = "prompt") -> None:
        """Raise ValueError (naming the problem and the fix) for a prompt the engine cannot serve."""
        if not token_ids:
            raise ValueError(f"{where} is empty; give at least one token")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(
                f"{where} has {len(token_ids)} tokens, more than max_model_len={self.config.max_model_len}; "
                "shorten it or raise max_model_len"
            )

    @staticmethod
    def check_params(params: SamplingParams, where: str = "sampling_params") -> None:
        """Validate ``params`` again (a field may have been changed after construction)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"{where} must be a SamplingParams, got {_describe(params)}")
        params.validate()

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams,
        stream: bool = False,
        detokenize: bool = True,
    ) -> str:
        """Queue a request after validating it whole; returns its id (given, or made up when None).

        ``stream=True`` produces an output at every step that gives the request tokens; otherwise
        one output when it finishes. ``detokenize=False`` leaves texts empty (the caller decodes the
        token ids, as the server does in its own process), except for a request with stop strings,
        which the engine must read to stop."""
        if self._closed:
            raise RuntimeError("the engine has been shut down; create a new one")
        self.check_params(params)
        token_ids = self.tokenize(prompt)
        self.validate(token_ids)
        if request_id is None:
            request_id = f"req-{next(self._auto_ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use; ids must be unique")
        seqs = []
        for i in range(params.n):
            child = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            seqs.append(Sequence(token_ids, child, self.config.kvcache_block_size))
        incremental = self.tokenizer is not None and ((stream and detokenize) or bool(params.stop))
        n = len(seqs)
        request = _Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            stream=stream,
            seqs=seqs,
            detokenizers=[
                IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if incremental else None
                for _ in seqs
            ],
            texts=[""] * n,
            logprobs=[[] for _ in seqs],
            num_streamed=[0] * n,
            text_deltas=[""] * n,
            detokenize=detokenize,
        )
        self.requests[request_id] = request
        if params.has_penalties:
            self._need_history.add(request_id)
        for i, seq in enumerate(seqs):
            self._seq_owner[seq.seq_id] = (request, i)
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Drop a request; its KV blocks are free when this returns, and the next step returns its
        final output (finish_reason "abort"), so whoever waits for it stops waiting. Unknown ids are
        ignored."""
        request = self._drop_request(request_id)
        if request is None:
            return
        self._unprocessed.pop(request_id, None)
        for seq in request.seqs:
            self._seq_owner.pop(seq.seq_id, None)
            self.scheduler.finish(seq, "abort")
        self._ready = [o for o in self._ready if o.request_id != request_id]
        self._ready.append(self._output(request, finished=True))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_cache_usage=s.block_manager.usage,
            num_preemptions=s.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
        )

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one model step; return an output for every streamed request that got
        tokens and every request that finished (or was aborted) since the last outputs were
        returned. With async scheduling the tokens come from the step launched by the previous
        call, and this call's step is left running.

        If scheduling or the model raises, the exception reaches the caller and the steps in flight
        leave no trace: no sequence advanced, no block became findable in the prefix cache, and the
        runners are told to drop their state (each sequence is sent in full again at its next step)."""
        start = time.perf_counter()
        drained = False
        try:
            if self._inflight is not None and self._need_history:
                self._apply(*self._collect(self._inflight))  # penalties read the last token too
                self._inflight, drained = None, True
            sched = self.scheduler.schedule()
            done, self._inflight = self._inflight, None
            if not sched.is_empty:
                if self.async_scheduling:
                    self._inflight = (sched, self.executor.execute_model_async(sched))
                else:
                    done = (sched, self.executor.execute_model(sched))
            launched = time.perf_counter()
            if done is not None:
                self._apply(*self._collect(done))
            collected = time.perf_counter()
        except BaseException:
            self._inflight = None
            self.scheduler.runners_lost_state()
            raise
        outputs = self._process()
        if done is not None or drained:
            self.last_step = replace(self.last_step, seconds=time.perf_counter() - start)
        if self._trace_dir is not None:
            s = self.last_step if done is not None or drained else None
            self._trace.append(
                (
                    start,
                    time.perf_counter() - start,
                    launched - start,
                    collected - launched,
                    s and s.num_prefill_tokens,
                    s and s.num_decode_tokens,
                    len(self.scheduler.running),
                    len(self.scheduler.waiting),
                    len(outputs),
                )
            )
        return outputs

    @staticmethod
    def _collect(launched) -> tuple:
        sched, result = launched
        return sched, result if isinstance(result, ModelRunnerOutput) else result.get()

    def _apply(self, sched: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """Book a finished step: advance its sequences, record the sampled tokens."""
        sampled = self.scheduler.update(sched, runner_output)
        self._record(sampled, runner_output.logprobs)
        num_decodes = sum(1 for n in sched.num_scheduled_tokens.values() if n == 1)
        num_prefill = sched.total_num_scheduled_tokens - num_decodes
        self.num_prompt_tokens += num_prefill
        self.num_generation_tokens += len(sampled)
        self.last_step = StepStats(num_prefill, num_decodes, 0.0)

    def _drop_request(self, request_id: str) -> _Request | None:
        self._need_history.discard(request_id)
        return self.requests.pop(request_id, None)

    def _record(self, sampled: list[tuple[Sequence, int]], logprobs) -> None:
        """Part of the step itself (plain bookkeeping): note which completions got a token."""
        unprocessed = self._unprocessed
        for seq, row in sampled:
            owner = self._seq_owner.get(seq.seq_id)
            if owner is None:
                continue
            request, i = owner
            if logprobs is not None and logprobs[row] is not None:
                request.logprobs[i].append(logprobs[row])
            # A request that is neither streamed nor detokenized as it goes has nothing to do
            # until a completion finishes.
            if request.stream or seq.is_finished or request.detokenizers[i] is not None:
                entry = unprocessed.get(request.request_id)
                if entry is None:
                    unprocessed[request.request_id] = (request, {i})
                else:
                    entry[1].add(i)

    def _process(self) -> list[RequestOutput]:
        """Detokenize and build the outputs of the requests that got tokens, one request at a time.
        If this raises, the requests not yet done stay in ``_unprocessed`` and the outputs already
        built in ``_ready``: the next step carries on from there."""
        for request_id, (request, touched) in list(self._unprocessed.items()):
            if request.detokenizers[0] is not None:  # all or none of a request's completions have one
                for i in sorted(touched):
                    self._detokenize(request, i, request.seqs[i])
                    touched.discard(i)
            finished = request.finished
            if request.stream or finished:
                self._ready.append(self._output(request, finished))
            del self._unprocessed[request_id]
            if finished:
                self._drop_request(request_id)
                for seq in request.seqs:
                    self._seq_owner.pop(seq.seq_id, None)
        outputs, self._ready = self._ready, []
        return outputs

    def _output(self, request: _Request, finished: bool) -> RequestOutput:
        """One snapshot of ``request``. Built field by field (no ``dataclasses.replace``): a streamed
        request gets one every step, so at 256 streams this is most of the engine's per-step Python."""
        completions = []
        with_logprobs = request.params.logprobs is not None
        for i, seq in enumerate(request.seqs):
            text, token_ids, logprobs = "", None, None
            if finished:
                text, token_ids = self._final_text(request, i), seq.completion_token_ids
                logprobs = list(request.logprobs[i]) if with_logprobs else None
            new, text_delta, new_logprobs = None, "", None
            if request.stream:
                # Only the tokens since the last output are sliced: not the whole completion each step.
                new = seq.token_ids[seq.num_prompt_tokens + request.num_streamed[i] :]
                request.num_streamed[i] += len(new)
                text_delta, request.text_deltas[i] = request.text_deltas[i], ""
                if with_logprobs and new:
                    new_logprobs = request.logprobs[i][-len(new) :]
            completions.append(
                CompletionOutput(
                    i, text, token_ids, seq.finish_reason, logprobs, new, text_delta, new_logprobs
                )
            )
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=request.seqs[0].num_prompt_cached_tokens or 0,
        )

    def _detokenize(self, request: _Request, i: int, seq: Sequence) -> None:
        """Advance incremental detokenization; finish ``seq`` on a stop string."""
        detok = request.detokenizers[i]
        if detok is None:
            return
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
        if len(detok.text) > before:
            request.text_deltas[i] += detok.text[before:]

    def _final_text(self, request: _Request, i: int) -> str:
        if request.detokenizers[i] is not None:
            return request.texts[i]
        if self.tokenizer is None or not request.detokenize:
            return ""
        ids = request.seqs[i].completion_token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=request.params.skip_special_tokens)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._inflight = None
        for request_id in list(self.requests):
            self.abort_request(request_id)
        self.executor.shutdown()
        if self._trace_dir is not None and self._trace:
            os.makedirs(self._trace_dir, exist_ok=True)
            path = os.path.join(self._trace_dir, f"steps.{os.getpid()}.{id(self)}.jsonl")
            with open(path, "w") as f:
                for row in self._trace:
                    f.write(json.dumps(dict(zip(_TRACE_FIELDS, row, strict=True))) + "\n")


_TRACE_FIELDS = (
    "start",
    "seconds",
    "launch_seconds",
    "collect_seconds",
    "prefill_tokens",
    "decode_tokens",
    "running",
    "waiting",
    "outputs",
)


def _token_id(t) -> int:
    if isinstance(t, bool):
        raise TypeError("bool is not a token id")
    return operator.index(t)


def _describe(x) -> str:
    name = type(x).__name__
    return f"{name} {x!r}" if isinstance(x, (int, float, bytes, type(None))) else name
