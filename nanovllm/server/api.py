"""The FastAPI app: routes, OpenAI-shaped errors, and the engine thread's lifetime."""

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse, JSONResponse, Response

import nanovllm
from nanovllm.server.async_engine import AsyncEngine
from nanovllm.server.chat import ChatCompletions
from nanovllm.server.completions import Completions
from nanovllm.server.metrics import ServerMetrics
from nanovllm.server.middleware import GuardMiddleware
from nanovllm.server.protocol import APIError, DetokenizeRequest, TokenizeRequest, parse
from nanovllm.server.serving import Serving

logger = logging.getLogger("nanovllm.server")
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_waiting_requests: int = -1  # -1: no limit
    log_prompts: bool = False


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine``; the engine thread starts and stops with the app's lifespan."""
    metrics = ServerMetrics(lambda: engine.stats, settings.served_model_name)
    args = (engine, metrics, settings.served_model_name, settings.max_waiting_requests, settings.log_prompts)
    completions, chat, util = Completions(*args), ChatCompletions(*args), Serving(*args)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        yield
        engine.shutdown()

    app = FastAPI(
        title="nanovllm", version=nanovllm.__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        logger.info("request rejected %s status=%d %s", request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request: Request, e: Exception) -> JSONResponse:
        error = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        return JSONResponse(error.body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, e: Exception) -> JSONResponse:
        error = APIError(
            405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
        return JSONResponse(error.body(), status_code=405)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions(request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat(request)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": settings.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "nanovllm",
            "root": engine.config.model,
            "max_model_len": engine.config.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.dead is None else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": nanovllm.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body: TokenizeRequest = parse(TokenizeRequest, await request.body())
        util.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = util.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            ids = util.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": util.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body: DetokenizeRequest = parse(DetokenizeRequest, await request.body())
        util.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < util.vocab_size]
        if bad:
            raise APIError(400, f"token id(s) {bad[:5]} are outside [0, {util.vocab_size})", param="tokens")
        return {"prompt": util.decode(body.tokens, skip_special_tokens=False)}

    if os.path.isdir(STATIC_DIR):  # the chat page (issue 13), when it is there
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/")
        async def index() -> Response:
            return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    return app
