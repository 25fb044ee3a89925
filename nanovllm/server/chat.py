"""POST /v1/chat/completions: the tokenizer's chat template, then OpenAI's chat shape."""

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from nanovllm.server.protocol import APIError, ChatCompletionRequest, parse
from nanovllm.server.serving import Serving, sse


class ChatCompletions(Serving):
    async def __call__(self, request: Request) -> Response:
        body: ChatCompletionRequest = parse(ChatCompletionRequest, await request.body())
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = self.chat_prompt(messages, body.chat_template_kwargs)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, ids, asked, param, logprobs=top_n)
        self.check_capacity()
        stream, log, created = self.start("chatcmpl", ids, params, messages)
        head = {"id": stream.request_id, "created": created, "model": self.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self._stream(request, stream, log, head, len(ids), params.n, top_n, usage),
                media_type="text/event-stream",
            )
        final = await self.final_output(request, stream, log)
        if final is None:
            return Response(status_code=499)  # the client left; nobody reads this
        choices = []
        for c in final.outputs:
            lp = None if c.logprobs is None else self._logprobs(c.token_ids, c.logprobs, top_n)
            message = {"role": "assistant", "content": c.text}
            choices.append(
                {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        num_completion = sum(len(c.token_ids) for c in final.outputs)
        usage = self.usage(len(ids), num_completion)
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            s = self.token_str(token_id)
            return {"token": s, "logprob": self.clamp(logprob), "bytes": list(s.encode())}

        content = []
        for t, d in zip(token_ids, logprobs, strict=True):
            top = [entry(k, v) for k, v in list(d.items())[:top_n]]
            content.append({**entry(t, d.get(t, float("-inf"))), "top_logprobs": top})
        return {"content": content}

    async def _stream(self, request, stream, log, head, num_prompt, n, top_n, include_usage):
        head = {**head, "object": "chat.completion.chunk"}
        role = {"role": "assistant", "content": ""}
        first = [{"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(n)]
        yield sse({**head, "choices": first})

        def choice(c) -> dict[str, Any] | None:
            lp = None
            if c.new_logprobs is not None and c.new_token_ids:
                lp = self._logprobs(c.new_token_ids, c.new_logprobs, top_n)
            if not (c.text_delta or lp or c.finish_reason is not None):
                return None
            delta = {"content": c.text_delta} if c.text_delta else {}
            return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}

        async for chunk in self.sse_chunks(request, stream, log, head, num_prompt, include_usage, choice):
            yield chunk
