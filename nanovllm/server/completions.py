"""POST /v1/completions: OpenAI's legacy completions, streamed or not, with echo and logprobs."""

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from nanovllm.server.protocol import APIError, CompletionRequest, parse
from nanovllm.server.serving import Serving


class Completions(Serving):
    async def __call__(self, request: Request) -> Response:
        body: CompletionRequest = parse(CompletionRequest, await request.body())
        self.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(
                    400,
                    f"got {len(prompt)} prompts; this server takes one prompt per request",
                    param="prompt",
                )
            prompt = prompt[0]
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of is not supported (leave it out, or equal to n)", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(
                400, "echo with logprobs needs prompt logprobs, which are not computed", param="echo"
            )
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = self.sampling_params(body, ids, body.max_tokens, "max_tokens", logprobs=body.logprobs)
        self.check_capacity()
        echo = (prompt if isinstance(prompt, str) else self.decode(ids)) if body.echo else None
        stream, log, created = self.start("cmpl", ids, params, prompt)
        head = {
            "id": stream.request_id,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
        }
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = self._stream(request, stream, log, head, len(ids), params.n, echo, usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        final = await self.final_output(request, stream, log)
        if final is None:
            return Response(status_code=499)  # the client left; nobody reads this
        choices = []
        for c in final.outputs:
            lp = None if c.logprobs is None else self._logprobs(c.token_ids, c.logprobs, 0)
            text = (echo or "") + c.text
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        num_completion = sum(len(c.token_ids) for c in final.outputs)
        return JSONResponse({**head, "choices": choices, "usage": self.usage(len(ids), num_completion)})

    def _logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]], offset: int
    ) -> dict[str, Any]:
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [
                self.clamp(d.get(t, float("-inf"))) for t, d in zip(token_ids, logprobs, strict=True)
            ],
            "top_logprobs": [{self.token_str(k): self.clamp(v) for k, v in d.items()} for d in logprobs],
            "text_offset": offsets,
        }

    def _stream(self, request, stream, log, head, num_prompt, n, echo, include_usage):
        offsets = [0] * n  # characters sent so far per completion, for logprobs' text_offset

        def choice(c) -> dict[str, Any] | None:
            text = c.text_delta
            if echo is not None and offsets[c.index] == 0 and (text or c.new_token_ids):
                text = echo + text
            lp = None
            if c.new_logprobs is not None and c.new_token_ids:
                lp = self._logprobs(c.new_token_ids, c.new_logprobs, offsets[c.index])
            offsets[c.index] += len(text)
            if not (text or c.new_token_ids or c.finish_reason is not None):
                return None
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}

        return self.sse_chunks(request, stream, log, head, num_prompt, include_usage, choice)
