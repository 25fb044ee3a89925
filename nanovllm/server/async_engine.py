"""The server's handle on the engine, which runs in its own process (engine_process.py); one
asyncio queue per request for the HTTP side.

Why a process: the engine's step is overlapped (the CPU prepares step N+1 while the GPU runs step
N), so every millisecond the event loop holds the GIL is a millisecond the GPU waits. With the
engine in a thread of the server, an H100 served 256 concurrent streams at 0.47 of offline
``generate`` (the server process used 12.9 CPU-seconds in 13.2 s), and at 0.84 with the engine in
its own process (one run, benchmarks/README.md). There the engine has a GIL to itself, as in vLLM
v1, and sends token ids: a step's message costs it 0.8 us a token
against the 11-13 us of detokenizing that moved to the server (benchmarks/bench_engine_outputs.py,
256 streams). On the 2 shared cores of the CPU machine, where no core is spare for a second
process, the two designs serve alike (server/offline medians, benchmarks/results.jsonl: SmolLM2
1.13 in a process, 1.05 in a thread over 6 and 9 runs; a tiny model 0.38 and 0.40).
``in_thread=True`` (``nanovllm serve --engine-in-thread``) runs the very same loop in a thread of
the server instead: six lines, kept for debugging (one process) and as the A/B baseline
(``bench_serve.py --engines process,thread``).

Who does what::

    event loop thread        add_request / abort --> _pending --> sender thread --> engine process
    reader thread            one message per step: stats, and per request OutputBuilder.update
                             (detokenizing here, off the engine process) --> call_soon_threadsafe
    event loop thread        _dispatch: each RequestOutput into its request's queue

``_streams`` is read and written only on the event loop thread, so an output that arrives for a
request the client already left is dropped there, and its abort follows it down the pipe. If the
engine process dies, ``dead`` is set (/health turns 503) and every waiting handler gets
``EngineDeadError``.
"""

import asyncio
import contextlib
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

from nanovllm.config import Config
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.engine_process import engine_main, start_engine, start_error, widen_pipe
from nanovllm.server.output_builder import OutputBuilder, load_tokenizer

logger = logging.getLogger("nanovllm.server")


class EngineDeadError(RuntimeError):
    """The engine stopped (shutdown, or its process died); no request can be served."""


class EngineStepError(RuntimeError):
    """A step raised: the requests in it failed, the engine goes on serving the others."""


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
    def __init__(
        self,
        model: str | None,
        engine_args: dict,
        in_thread: bool = False,
        log_level: str = "info",
        executor_factory: Callable[[Config], Any] | None = None,
    ):
        """Validate the arguments, start the engine and wait until it is ready. A start-up error
        in the engine process is raised here with its type (ValueError, TypeError,
        FileNotFoundError; RuntimeError for the rest) and message."""
        self.config = Config.from_kwargs(model, **engine_args)
        self.tokenizer = load_tokenizer(self.config)
        self.dead: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._builders: dict[str, OutputBuilder] = {}  # shared with the reader thread
        self._pending: list[tuple] = []
        self._cond = threading.Condition()
        self._num_sent = self._num_added = 0  # adds sent down / seen by the engine
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        ctx = mp.get_context("spawn")
        commands, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs = ctx.Pipe(duplex=False)
        widen_pipe(self._commands)
        widen_pipe(self._outputs)
        if in_thread:  # built here, stepped on the engine thread; the pipes stay in this process
            self._worker = start_engine(commands, outputs, model, engine_args, executor_factory)
        else:  # not a daemon: daemons may not start tensor-parallel workers
            args = (commands, outputs, model, engine_args, log_level, executor_factory)
            self._worker = ctx.Process(target=engine_main, args=args, name="nanovllm-engine")
            self._worker.start()
            commands.close()  # the engine process holds these ends; closing ours makes its exit an EOF
            outputs.close()
        try:
            hello = self._outputs.recv()
        except EOFError:
            self._stop_worker(10)
            raise RuntimeError(
                f"the engine process exited ({self._exit_status()}) while starting; see the log above"
            ) from None
        except BaseException:  # Ctrl-C while the model loads
            self._stop_worker(0)
            raise
        if hello[0] == "error":
            self._stop_worker(10)
            raise start_error(*hello[1:])
        self.stats = hello[1]  # the engine's stats() after its latest step

    @property
    def pid(self) -> int | None:
        """The engine process's id (None when it runs in a thread)."""
        return getattr(self._worker, "pid", None)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        threading.Thread(target=self._send_commands, name="nanovllm-sender", daemon=True).start()
        threading.Thread(target=self._read_outputs, name="nanovllm-reader", daemon=True).start()

    # ---- event loop side -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's waiting queue plus adds it has not seen yet."""
        return self.stats.num_waiting + self._num_sent - self._num_added

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped ({self.dead}); restart the server")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._builders[request_id] = OutputBuilder(request_id, prompt, params, self.tokenizer)
        self._num_sent += 1
        self._push(("add", request_id, prompt, params))
        return stream

    def abort(self, request_id: str) -> None:
        """Forget the request and free its blocks at the next step; a no-op once it finished."""
        if self._streams.pop(request_id, None) is not None:
            self._builders.pop(request_id, None)
            self._push(("abort", request_id))

    def _push(self, command: tuple) -> None:
        with self._cond:
            self._pending.append(command)
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
        self._builders.clear()
        for stream in streams.values():
            stream.queue.put_nowait(exc)

    # ---- the two pipe threads --------------------------------------------------------------

    def _send_commands(self) -> None:
        """Batches of commands down the pipe, so that a full pipe never blocks the event loop."""
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending, []
            try:
                self._commands.send(batch)
            except OSError:  # the engine is gone; the reader thread says so
                return
            if batch[-1][0] == "stop":
                return

    def _read_outputs(self) -> None:
        while True:
            try:
                step_start, stats, num_added, packed, failed = self._outputs.recv()
            except (EOFError, OSError):
                break
            outputs = []
            for p in packed:
                builder = self._builders.get(p[0])
                if builder is None:
                    continue  # aborted
                outputs.append(builder.update(p))
                if outputs[-1].finished:
                    self._builders.pop(p[0], None)
            failures = [(rid, _error(kind, message)) for rid, kind, message in failed]
            self.stats, self._num_added = stats, num_added
            self._loop.call_soon_threadsafe(self._dispatch, outputs, failures, step_start)
        if not self._stopping:
            self._worker.join(5)
            error = EngineDeadError(f"the engine process died ({self._exit_status()})")
            logger.error("%s; the server can serve no more requests: restart it", error)
            self.dead = error
            self._loop.call_soon_threadsafe(self._fail_all, error)

    # ---- stopping --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left, stop the engine (its memory and worker processes go with it)."""
        self._stopping = True
        if self.dead is None:
            self.dead = EngineDeadError("the server is shutting down")
        self._push(("stop",))
        if self._loop is None:  # never started: nobody sends
            with contextlib.suppress(OSError):
                self._commands.send([("stop",)])
        self._stop_worker(timeout)
        if self._loop is not None and not self._loop.is_closed():
            self._fail_all(EngineDeadError("the server is shutting down"))

    def _stop_worker(self, timeout: float) -> None:
        if self._worker is None:  # in a thread, and the engine never started
            return
        self._worker.join(timeout)
        if isinstance(self._worker, mp.process.BaseProcess) and self._worker.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", timeout)
            self._worker.kill()
            self._worker.join(10)

    def _exit_status(self) -> str:
        code = getattr(self._worker, "exitcode", None)
        if code is None:
            return "still running" if self._worker and self._worker.is_alive() else "exit status unknown"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _error(kind: str, message: str) -> Exception:
    if kind == "step":
        return EngineStepError(message)
    return TypeError(message) if kind == "TypeError" else ValueError(message)
