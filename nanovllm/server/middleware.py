"""Two checks in front of every route, as plain ASGI middleware: the body size limit (413) and
the API key (401). Both answer in OpenAI's error shape before any handler runs."""

import hmac
import json

from nanovllm.server.protocol import APIError

# Paths served without the API key: probes, the metrics scrape, and the static chat page.
_OPEN_PATHS = ("/health", "/metrics", "/version", "/", "/static")


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    def __init__(self, app, max_body_bytes: int, api_key: str | None = None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    def _authorized(self, scope) -> bool:
        if self.expected is None:
            return True
        path = scope["path"]
        if path in _OPEN_PATHS or path.startswith("/static/"):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)  # constant time: no key prefix leaks

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            error = APIError(
                401,
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await send_error(send, error)
        too_large = APIError(
            413,
            f"the request body is over the limit of {self.max_body_bytes} bytes; send a smaller "
            "request or start the server with a larger --max-body-bytes",
            code="request_too_large",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await send_error(send, too_large)
        if length is not None:
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body here, within the limit, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await send_error(send, too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
