"""The offline entry point: ``LLM(model).generate(prompts, sampling_params)``.

``LLM`` owns the engine's step loop in this process. Whichever call happens to step the engine
(``generate``, or a ``stream`` being read) files every output under its request's inbox, so a
half-read stream and a ``generate`` on the same ``LLM`` each get their own outputs. Calls from
several threads take turns at the engine (one lock around every engine call).
"""

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import count
from typing import Any

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        self.config = Config.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._lock = threading.RLock()
        self._inbox: dict[str, deque[RequestOutput]] = {}
        self._ids = count()
        self._closed = False
        self._abandoned: deque[str] = deque()  # requests of streams garbage-collected mid-step
        self._owner: int | None = None  # the thread inside an engine call, if any

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._inbox.clear()
            self.engine.shutdown()

    # ---- the loop --------------------------------------------------------------------------

    @contextmanager
    def _engine(self):
        with self._held():
            if self._closed:
                raise RuntimeError("the engine has been shut down; create a new LLM")
            while self._abandoned:
                self._abort([self._abandoned.popleft()])
            yield self.engine

    @contextmanager
    def _held(self):
        """The lock, noting which thread is inside an engine call (see ``_abandon``)."""
        with self._lock:
            outer, self._owner = self._owner, threading.get_ident()
            try:
                yield
            finally:
                self._owner = outer

    def _submit(self, prompts: list, params: list[SamplingParams], stream: bool) -> list[str]:
        """Validate every prompt and parameter set, then queue all of them (or none)."""
        with self._engine() as engine:
            token_ids = []
            for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
                engine.check_params(sp, where=f"sampling_params[{i}]")
                ids = engine.tokenize(prompt)
                engine.validate(ids, where=f"prompt {i}")
                token_ids.append(ids)
            request_ids = []
            try:
                for ids, sp in zip(token_ids, params, strict=True):
                    request_id = f"llm-{next(self._ids)}"
                    self._inbox[request_id] = deque()
                    request_ids.append(engine.add_request(request_id, ids, sp, stream=stream))
            except BaseException:
                self._abort(request_ids)
                raise
            return request_ids

    def _step(self) -> None:
        with self._engine() as engine:
            for out in engine.step():
                box = self._inbox.get(out.request_id)
                if box is not None:
                    box.append(out)

    def _abort(self, request_ids: list[str]) -> None:
        with self._held():
            for request_id in request_ids:
                self._inbox.pop(request_id, None)
                if not self._closed:
                    self.engine.abort_request(request_id)

    # ---- public calls ----------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Generate completions for every prompt; results come back in input order.

        Every prompt and parameter set is validated before any is queued, so a bad one raises
        (ValueError or TypeError) and leaves the engine as it was.
        """
        if self._closed:
            raise RuntimeError("the engine has been shut down; create a new LLM")
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or len(sampling_params) != len(prompts):
            got = len(sampling_params) if isinstance(sampling_params, (list, tuple)) else sampling_params
            raise ValueError(
                f"got {got!r} sampling params for {len(prompts)} prompts; "
                "pass one SamplingParams, or one per prompt"
            )
        request_ids = self._submit(prompts, list(sampling_params), stream=False)
        results: dict[str, dict] = {}
        from tqdm.auto import tqdm  # here, not at the top: its import (asyncio) costs every start-up

        bar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while len(results) < len(request_ids):
                self._step()
                for request_id in request_ids:
                    box = self._inbox.get(request_id)
                    if box:
                        results[request_id] = _to_dict(box.pop())
                        del self._inbox[request_id]
                        bar.update(1)
                stats = self.engine.last_step
                if use_tqdm and stats is not None and stats.seconds > 0:
                    bar.set_postfix(
                        tok_s=f"{(stats.num_prefill_tokens + stats.num_decode_tokens) / stats.seconds:.0f}"
                    )
        except BaseException:
            self._abort(request_ids)
            raise
        finally:
            bar.close()
        return [results[r] for r in request_ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[dict]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or a list of
        them, through the model's chat template with the generation prompt added (as vLLM does)."""
        if self._closed:
            raise RuntimeError("the engine has been shut down; create a new LLM")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        for m in conversation:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")
        ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, **kwargs
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def stream(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None
    ) -> Iterator[dict]:
        """Generate for one prompt, yielding each step's increment: ``{"text_delta", "token_ids"
        (new ones), "finished", "finish_reason"}``. The text is correct across multi-byte characters.

        The request is validated and queued by this call (errors raise here, not at the first
        ``next``); closing the iterator early aborts it."""
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams) and params.n != 1:
            raise ValueError("stream() serves one completion; use n=1")
        (request_id,) = self._submit([prompt], [params], stream=True)
        return _Stream(self, request_id)

    def _abandon(self, request_id: str) -> None:
        """A stream was garbage-collected unfinished: abort its request now, or, when the collection
        ran inside an engine call on this thread (mid-step), at the start of the next engine call."""
        self._abandoned.append(request_id)
        if self._owner != threading.get_ident() and not self._closed:
            with suppress(RuntimeError), self._engine():  # RuntimeError: shut down meanwhile
                pass


class _Stream(Iterator[dict]):
    """What ``LLM.stream`` returns. ``close()``, or the object being garbage-collected, aborts the
    request, even before the first ``next()`` (a generator's ``finally`` would not run then)."""

    def __init__(self, llm: LLM, request_id: str):
        self._llm, self.request_id, self._open = llm, request_id, True

    def __next__(self) -> dict:
        try:
            while self._open:
                box = self._llm._inbox.get(self.request_id)
                if box is None:
                    break  # aborted, or the LLM was shut down
                if not box:
                    self._llm._step()
                    continue
                out = box.popleft()
                if out.finished:
                    self.close()
                c = out.outputs[0]
                return {
                    "text_delta": c.text_delta,
                    "token_ids": c.new_token_ids,
                    "finished": out.finished,
                    "finish_reason": c.finish_reason,
                }
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        if self._open:
            self._open = False
            self._llm._abort([self.request_id])

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            self._llm._abandon(self.request_id)


def _as_prompt_list(prompts) -> list:
    """One prompt (a str or a list of ints) becomes a list of one; a list of prompts stays."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and not isinstance(prompts[0], (str, list, tuple)):
            return [prompts]  # token ids of one prompt (checked by the engine)
        return list(prompts)
    raise TypeError(
        f"prompts must be a str, a list of int token ids, or a list of those; got {type(prompts).__name__}"
    )


def _to_dict(out: RequestOutput) -> dict:
    """vLLM's fields, flattened as Nano-vLLM returns them; ``outputs`` holds all n completions."""
    completions = [
        {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason, "logprobs": c.logprobs}
        for c in out.outputs
    ]
    return {
        **completions[0],
        "prompt_token_ids": out.prompt_token_ids,
        "num_cached_tokens": out.num_cached_tokens,
        "outputs": completions,
    }
