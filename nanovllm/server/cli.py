"""``nanovllm serve [MODEL]``: the OpenAI-compatible server. Every engine argument is a flag,
generated from ``Config``'s fields (dashes for underscores), so new engine arguments appear here
without an edit."""

import argparse
import contextlib
import logging
import os
import signal
import sys
import types
from dataclasses import MISSING, fields
from typing import Union, get_args, get_origin

from nanovllm.config import Config


def _flag_type(annotation) -> type:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine arguments (as LLM(...) takes them)")
    for f in fields(Config):
        if not f.init or f.name == "model":
            continue
        flag, kind = "--" + f.name.replace("_", "-"), _flag_type(f.type)
        default = None if f.default is MISSING else f.default
        if kind is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"(default: {default})",
            )
        else:
            group.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=f"(default: {default})",
            )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="nanovllm serve", description=__doc__)
    p.add_argument(
        "model", nargs="?", default=None, help="model directory or .gguf (default: bundled SmolLM2)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOVLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $NANOVLLM_API_KEY, else none)",
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=-1,
        help="answer 503 + Retry-After while this many requests wait (default -1: no limit)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="413 above this (default 4 MiB)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 10)",
    )
    p.add_argument("--log-prompts", action="store_true", help="put prompts in the per-request log lines")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--engine-in-thread",
        action="store_true",
        help="run the engine in a thread of the server instead of its own process (one process to "
        "debug; slower under load: the event loop and the engine share one GIL)",
    )
    add_engine_args(p)
    return p


def _served_name(model_arg: str | None, resolved: str) -> str:
    if model_arg is not None:
        return model_arg
    return os.path.basename(resolved.rstrip("/")).removesuffix(".gguf")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nanovllm.server.api import ServerSettings, build_app
    from nanovllm.server.async_engine import AsyncEngine

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    names = {f.name for f in fields(Config) if f.init and f.name != "model"}
    engine_args = {k: v for k, v in vars(args).items() if k in names}
    engine = AsyncEngine(args.model, engine_args, in_thread=args.engine_in_thread, log_level=args.log_level)
    config = engine.config
    settings = ServerSettings(
        served_model_name=args.served_model_name or _served_name(args.model, config.model),
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_waiting_requests=args.max_waiting_requests,
        log_prompts=args.log_prompts,
    )
    app = build_app(engine, settings)
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # one line per request comes from nanovllm.server instead
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    try:
        _Server(uv_config).run()
    finally:
        engine.shutdown()  # a no-op after the app's lifespan stopped it; not so if uvicorn never started
    return 0


class _Server:
    """uvicorn's server, except that SIGINT/SIGTERM end it with exit status 0: uvicorn re-raises
    the signal after its graceful shutdown, which would make a clean stop look like a crash."""

    def __init__(self, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                def stop(sig, frame):
                    if self.should_exit and sig == signal.SIGINT:
                        self.force_exit = True  # a second Ctrl-C: stop waiting for requests
                    self.should_exit = True

                previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()
        if not self.server.started:
            raise SystemExit(1)  # could not bind; uvicorn said why


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return serve(args)
