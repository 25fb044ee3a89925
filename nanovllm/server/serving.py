"""What completions and chat share: admission, prompt checks, sampling parameters, and the
disconnect-aware stream of a request's outputs."""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineDeadError, EngineStepError, RequestStream
from nanovllm.server.metrics import RequestLog, ServerMetrics
from nanovllm.server.protocol import APIError, SamplingRequest

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf
_DISCONNECTED = object()  # put into a request's queue when its client leaves


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Serving:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        model_name: str,
        max_waiting_requests: int = -1,
        log_prompts: bool = False,
    ):
        self.engine, self.metrics, self.model_name = engine, metrics, model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.config.max_model_len
        self.vocab_size: int = engine.config.hf_config.vocab_size
        self.max_waiting_requests = max_waiting_requests
        self.log_prompts = log_prompts

    # ---- checks, all before the engine sees the request ------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_capacity(self) -> None:
        if self.engine.dead is not None:
            raise APIError(503, "the engine has stopped; restart the server", type="server_error")
        if 0 <= self.max_waiting_requests <= self.engine.num_waiting:
            raise APIError(
                503,
                f"the server is busy: {self.engine.num_waiting} requests are waiting (the limit is "
                f"--max-waiting-requests={self.max_waiting_requests}); retry after a second",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer; send token ids", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """A token's text; a token that is part of a multi-byte character (it alone decodes to
        U+FFFD) is named by its vocabulary entry instead, so that distinct tokens stay distinct."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        text = self.tokenizer.decode([token_id])
        if not text or "\ufffd" in text:
            return str(self.tokenizer.convert_ids_to_tokens(token_id))
        return text

    def chat_prompt(self, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, **(template_kwargs or {})
            )
        except Exception as e:  # jinja's TemplateError: roles out of order, a missing field, ...
            raise APIError(400, f"the chat template failed: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding on transformers 5
            ids = ids["input_ids"]
        return list(ids)

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str = "max_tokens") -> int:
        """Check the prompt's tokens; return max_tokens (None: what the context has left)."""
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"prompt token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        left = self.max_model_len - len(ids)
        if max_tokens is None and left >= 1:
            return left
        if max_tokens is None or (max_tokens >= 1 and max_tokens > left):
            asked = len(ids) + (max_tokens or 1)
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but {asked} were "
                f"asked for ({len(ids)} in the prompt, {max_tokens or 1} for the completion); "
                f"shorten the prompt or lower {param}",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def sampling_params(
        self, body: SamplingRequest, ids: list[int], max_tokens: int | None, param: str, logprobs: int | None
    ) -> SamplingParams:
        """The request's ``SamplingParams``, the one mapping for both endpoints: its sampling fields,
        ``max_tokens`` checked against the context left after the prompt (None: all of it), and
        ``logprobs`` (top-n per token, or None). A bad value is a 400 naming the field."""
        fields = dict(body.sampling_fields(), max_tokens=self.check_prompt(ids, max_tokens, param))
        fields["logprobs"] = logprobs
        try:
            return SamplingParams(**fields)
        except (ValueError, TypeError) as e:
            name = str(e).split(" ", 1)[0]
            raise APIError(
                400, str(e), param=name if name in fields else None, code="invalid_value"
            ) from None

    # ---- running a request -----------------------------------------------------------------

    def start(self, prefix: str, ids: list[int], params: SamplingParams, prompt: Any):
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        log = RequestLog(self.metrics, request_id, len(ids), prompt if self.log_prompts else None)
        return self.engine.add_request(request_id, ids, params), log, int(time.time())

    async def outputs(
        self, request: Request, stream: RequestStream, log: RequestLog
    ) -> AsyncIterator[list[Any]]:
        """The request's outputs in order, in batches: all that arrived since the handler last ran
        (one step's output when it keeps up; several when the event loop fell behind, so that a busy
        server writes once per request, not once per step). Ends early, aborting the request, if the
        client leaves (or the handler is cancelled); raises APIError if the engine refused or failed
        it. A disconnect puts a marker into the queue, so waiting is one ``queue.get()``: no task or
        ``asyncio.wait`` per token."""
        queue = stream.queue
        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(lambda w: w.cancelled() or queue.put_nowait(_DISCONNECTED))
        status = "disconnected"
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                outs, error = [], None
                for item in batch:
                    if item is _DISCONNECTED:
                        return  # the client left
                    if isinstance(item, BaseException):
                        error = item  # the engine sends nothing for this request after an error
                        break
                    log.on_output(item)
                    outs.append(item)
                if outs:
                    yield outs
                    if outs[-1].finished:
                        status = "ok"
                        return
                if error is not None:
                    raise error
        except (ValueError, TypeError, EngineDeadError, EngineStepError) as e:
            status = "error"  # refused by the engine: 400; the engine stopped: 503; a step failed: 500
            code = 503 if isinstance(e, EngineDeadError) else 500 if isinstance(e, EngineStepError) else 400
            raise APIError(code, str(e), **({"type": "server_error"} if code >= 500 else {})) from None
        finally:
            watcher.cancel()
            if status != "ok":
                self.engine.abort(stream.request_id)
            log.finish(status, stream.first_scheduled)

    async def final_output(self, request: Request, stream: RequestStream, log: RequestLog) -> Any:
        last = None
        async with contextlib.aclosing(self.outputs(request, stream, log)) as batches:
            async for batch in batches:
                last = batch[-1]
        return last if last is not None and last.finished else None

    async def sse_chunks(
        self,
        request: Request,
        stream: RequestStream,
        log: RequestLog,
        head: dict[str, Any],
        num_prompt: int,
        include_usage: bool,
        choice: Callable[[Any], dict[str, Any] | None],
    ) -> AsyncIterator[str]:
        """A streamed request's server-sent events: a chunk per step with the choices that ``choice``
        makes of each completion's increment (None: nothing to send for it), a completion left out
        once it finished; then usage if asked, and ``[DONE]``. An error after the response started
        becomes an error event. A batch of outputs goes out as one write."""
        done: set[int] = set()
        num_completion = 0
        try:
            async with contextlib.aclosing(self.outputs(request, stream, log)) as batches:
                async for batch in batches:
                    events = []
                    for out in batch:
                        choices = []
                        for c in out.outputs:
                            if c.index in done:
                                continue
                            num_completion += len(c.new_token_ids or ())
                            if c.finish_reason is not None:
                                done.add(c.index)
                            if (item := choice(c)) is not None:
                                choices.append(item)
                        if choices:
                            events.append(sse({**head, "choices": choices}))
                    if events:
                        yield "".join(events)
        except APIError as e:
            yield sse(e.body())
        if include_usage:
            yield sse({**head, "choices": [], "usage": self.usage(num_prompt, num_completion)})
        yield "data: [DONE]\n\n"

    @staticmethod
    def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
        total = num_prompt + num_completion
        return {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": total}

    @staticmethod
    def clamp(logprob: float) -> float:
        return max(logprob, _LOGPROB_FLOOR)
