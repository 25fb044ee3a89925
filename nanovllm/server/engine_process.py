"""The engine core's side of the server: ``LLMEngine`` and its step loop, in a process of its own.

The server process (async_engine.py) spawns ``engine_main`` and talks to it over two one-way pipes::

    server process                                      engine process (the only owner of LLMEngine)
    --------------                                      --------------
    sender thread -- [("add", id, prompt, params), ("abort", id), ("stop",)] --> commands
    reader thread <-- (step_start, stats, num_added, outputs, failures) -------- one message per step

A step's message carries only what changed, as plain tuples (see ``_pack``): new token ids,
finish reasons, new logprobs, and text only for requests with stop strings (the engine must
detokenize those to stop them); the server process detokenizes everything else, so that the
Python work per token stays off this process, whose engine thread is what keeps the GPU fed.
``step_start`` is ``time.monotonic()``, one clock for every process of the machine (Linux).

The loop blocks on the command pipe while there is nothing to run (no busy wait) and drains it
without blocking between steps. The server going away (killed, crashed) closes the pipe: the loop
reads EOF, shuts the engine down (tensor-parallel workers included) and the process exits.
"""

import contextlib
import fcntl
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("nanovllm.server")

_PASSED_ON = (ValueError, TypeError, FileNotFoundError)  # start-up errors the CLI prints as they are


def engine_main(
    commands,
    outputs,
    model: str | None,
    engine_args: dict,
    log_level: str = "info",
    executor_factory: Callable[[Any], Any] | None = None,
) -> None:
    """The engine process's body (see ``start_engine``); it exits when the loop ends."""
    # Ctrl-C reaches the whole process group; the server decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = start_engine(commands, outputs, model, engine_args, executor_factory)
    if loop is not None:
        loop.join()


def start_engine(
    commands,
    outputs,
    model: str | None,
    engine_args: dict,
    executor_factory: Callable[[Any], Any] | None = None,
) -> threading.Thread | None:
    """Build the engine on this thread, answer ("ready", stats) or ("error", kind, message,
    traceback), and start the loop on a thread of its own, which serves commands until "stop" or
    EOF and then shuts the engine down. ``executor_factory(config)`` replaces the model runner
    (tests); it must pickle (a module-level function).

    Why a second thread: on the CPU, steps run from the thread that built the engine were up to 5x
    slower than from another thread (2 shared cores, tiny model: 1,035 against 5,078 tok/s, OpenMP
    teams under contention); offline ``LLM.generate`` in benchmarks/bench_serve.py and the engine
    thread of the old in-server design both step from a second thread too, so this keeps the
    comparison about the process boundary alone. The main thread only waits."""
    try:
        from nanovllm.config import Config
        from nanovllm.engine.llm_engine import LLMEngine

        config = Config.from_kwargs(model, **engine_args)
        executor = None if executor_factory is None else executor_factory(config)
        engine = LLMEngine(config, executor=executor)
    except Exception as e:  # Ctrl-C (in a thread) and exits pass through
        passed_on = isinstance(e, _PASSED_ON)
        kind, message = (type(e).__name__, str(e)) if passed_on else ("RuntimeError", repr(e))
        with contextlib.suppress(OSError):
            outputs.send(("error", kind, message, traceback.format_exc()))
        _close(commands, outputs)
        return None
    outputs.send(("ready", engine.stats()))
    thread = threading.Thread(
        target=_serve, args=(engine, commands, outputs), name="nanovllm-engine", daemon=True
    )
    thread.start()
    return thread


def start_error(kind: str, message: str, tb: str) -> Exception:
    """The server-side exception for an ("error", ...) answer: the same type and message for the
    errors the CLI prints as they are, a RuntimeError (its traceback logged) for the rest."""
    known = {e.__name__: e for e in _PASSED_ON}
    if kind in known:
        return known[kind](message)
    logger.error("the engine failed to start:\n%s", tb)
    return RuntimeError(f"the engine failed to start: {message}")


def widen_pipe(conn) -> None:
    """A 1 MiB pipe (64 KiB by default on Linux): a step's message is ~9 KB at 256 streams, so the
    engine does not block on a server process that falls a few steps behind."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)


def _serve(engine, commands, outputs) -> None:
    try:
        EngineLoop(engine, commands, outputs).run()
    except (EOFError, OSError):
        logger.info("the server is gone; the engine stops")
    finally:
        engine.shutdown()
        _close(commands, outputs)


def _close(*conns) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()


class EngineLoop:
    """One owner of the engine: apply the server's commands, step, send the step's outputs."""

    def __init__(self, engine, commands, outputs):
        self.engine, self.commands, self.outputs = engine, commands, outputs
        self.live: set[str] = set()  # requests added and not yet finished or aborted
        self.num_added = 0  # add commands received, so the server can count those still in the pipe
        self.stopping = False

    def run(self) -> None:
        engine = self.engine
        while True:
            failures: list[tuple[str, str, str]] = []
            if not engine.has_unfinished_requests():
                self._apply(self.commands.recv(), failures)  # idle: sleep until the server writes
            while not self.stopping and self.commands.poll():
                self._apply(self.commands.recv(), failures)
            if self.stopping:
                break
            step_start, outputs = time.monotonic(), []
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as e:  # the step left no trace: fail its requests, keep serving
                    logger.exception("engine step failed; failing the %d requests in flight", len(self.live))
                    for request_id in self.live:
                        engine.abort_request(request_id)
                        failures.append((request_id, "step", f"engine step failed: {e!r}"))
                    self.live.clear()
                self.live.difference_update(o.request_id for o in outputs if o.finished)
            packed = [_pack(o) for o in outputs]
            self.outputs.send((step_start, engine.stats(), self.num_added, packed, failures))
        for request_id in self.live:
            engine.abort_request(request_id)

    def _apply(self, batch: list[tuple], failures: list[tuple[str, str, str]]) -> None:
        for cmd in batch:
            if cmd[0] == "add":
                _, request_id, prompt, params = cmd
                self.num_added += 1
                try:
                    self.engine.add_request(request_id, prompt, params, stream=True, detokenize=False)
                    self.live.add(request_id)
                except (ValueError, TypeError) as e:
                    failures.append((request_id, type(e).__name__, str(e)))
            elif cmd[0] == "abort":
                self.engine.abort_request(cmd[1])
                self.live.discard(cmd[1])
            else:  # "stop"
                self.stopping = True


def _pack(out) -> tuple:
    """A ``RequestOutput`` as (request_id, finished, num_cached_tokens, completions), each completion
    (index, new_token_ids, new_logprobs, finish_reason, text_delta, text): only the completions that
    got tokens or finished, and texts only where the engine made them (stop strings)."""
    completions = [
        (c.index, c.new_token_ids, c.new_logprobs, c.finish_reason, c.text_delta, c.text)
        for c in out.outputs
        if c.new_token_ids or c.finish_reason is not None
    ]
    return out.request_id, out.finished, out.num_cached_tokens, completions
