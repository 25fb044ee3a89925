"""The engine in its own thread; one asyncio queue per request for the HTTP side.

Why a thread and not a process: the forward pass runs in torch kernels that release the GIL, and
the rest of a step (scheduling, sampling bookkeeping, detokenizing) is short next to it, so the
event loop and the engine overlap well in one process. A thread also shares the tokenizer and the
outputs without serializing anything. A process (vLLM v1's choice) pays off when the per-step
Python work is what limits throughput; ``benchmarks/bench_serve.py`` measures the ratio to offline
``generate`` that decides it.

Threading contract::

    event loop thread                          engine thread (the only one that touches the engine)
    -----------------                          -------------
    add_request / abort --> _commands (lock) --> drained between steps; engine.add_request / abort
    RequestStream.queue <-- call_soon_threadsafe(_dispatch, this step's outputs) <-- engine.step()

``_streams`` is read and written only on the event loop thread, so an output that arrives for a
request the client already left is dropped there, and its abort follows it through ``_commands``.
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm.server")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown, or its loop broke); no request can be served."""


class EngineStepError(RuntimeError):
    """A step raised: the requests in it failed, the engine goes on serving the others."""


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """What one HTTP handler sees of its request: outputs in step order, or an exception."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None  # start of the first step that returned it

    async def get(self) -> Any:
        item = self.queue.get_nowait() if not self.queue.empty() else await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    def __init__(self, engine: Any):
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.stats = engine.stats()  # a snapshot, replaced by the engine thread after every step
        self.dead: BaseException | None = None
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    # ---- event loop side -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's waiting queue plus adds not yet handed to it."""
        return self.stats.num_waiting + len(self._commands)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped ({self.dead!r}); restart the server")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._push(_Add(request_id, prompt, params))
        return stream

    def abort(self, request_id: str) -> None:
        """Forget the request and free its blocks at the next step; a no-op once it finished."""
        if self._streams.pop(request_id, None) is not None:
            self._push(_Abort(request_id))

    def _push(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _dispatch(self, outputs: list, failures: list, step_start: float) -> None:
        for request_id, exc in failures:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.queue.put_nowait(exc)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted while this step ran
            if stream.first_scheduled is None:
                stream.first_scheduled = step_start
            stream.queue.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.queue.put_nowait(exc)

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        engine, live = self.engine, set()
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._cond.wait()
                    commands, self._commands = self._commands, []
                    if self._stopping:
                        break
                failures = []
                for cmd in commands:
                    if isinstance(cmd, _Abort):
                        engine.abort_request(cmd.request_id)
                        live.discard(cmd.request_id)
                        continue
                    try:
                        engine.add_request(cmd.request_id, cmd.prompt, cmd.params, stream=True)
                        live.add(cmd.request_id)
                    except (ValueError, TypeError) as e:
                        failures.append((cmd.request_id, e))
                step_start, outputs = time.monotonic(), []
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as e:  # the step left no trace: fail its requests, keep serving
                        logger.exception("engine step failed; failing the %d requests in flight", len(live))
                        error = EngineStepError(f"engine step failed: {e!r}")
                        for request_id in live:
                            engine.abort_request(request_id)
                            failures.append((request_id, error))
                        live.clear()
                    live.difference_update(o.request_id for o in outputs if o.finished)
                self.stats = engine.stats()
                if outputs or failures:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, failures, step_start)
            for request_id in live:
                engine.abort_request(request_id)
            self.stats = engine.stats()
        except BaseException as e:  # the loop broke: every waiting handler gets a 500, health turns 503
            logger.exception("the engine thread failed; the server can serve no more requests")
            self.dead = e
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine failed: {e!r}"))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left, stop the thread, free the engine (its memory and worker processes)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.dead is None:
            self.dead = EngineDeadError("the server is shutting down")
        if self._loop is not None and not self._loop.is_closed():
            self._fail_all(EngineDeadError("the server is shutting down"))
        self.engine.shutdown()
