"""Client disconnects (real sockets) abort their requests; SIGTERM/SIGINT stop the server cleanly."""

import json
import os
import signal
import socket
import time

import pytest

from tests.server.conftest import API_KEY, ENGINE_ARGS, Server, curl, engine_flags

LONG = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0}


def open_request(server: Server, body: dict, path: str = "/v1/completions") -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def wait_running(server: Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()["vllm:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "while-waiting"])
def test_disconnect_aborts_the_request(server, stream):
    idle = server.wait_idle()
    assert idle["vllm:kv_cache_usage_perc"] == 0
    sock = open_request(server, {**LONG, "stream": stream})
    if stream:
        assert b"data: " in read_until(sock, b"data: ")
    else:
        wait_running(server)
    sock.close()
    after = server.wait_idle()
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]
    # Aborted, not run to its end: far fewer than 240 tokens were generated for it.
    assert after["vllm:generation_tokens_total"] - idle["vllm:generation_tokens_total"] < 240


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except OSError:
                pass
    return kids


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def engine_pid(server: Server) -> int:
    """The engine process: the server's spawned child (the other one is multiprocessing's resource
    tracker)."""
    (pid,) = [p for p in _children(server.proc.pid) if "spawn_main" in _cmdline(p)]
    return pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], timeout: float = 20) -> bool:
    """Whether all ``pids`` have exited (the multiprocessing resource tracker leaves just after us)."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, tp", [(signal.SIGTERM, 2), (signal.SIGINT, 1)], ids=["SIGTERM-tp2", "SIGINT-tp1"]
)
def test_signal_finishes_in_flight_and_exits_0(chat_ckpt, sig, tp):
    """At tensor_parallel_size 2 (CPU ranks over gloo) worker processes exist and must not outlive it."""
    server = Server(chat_ckpt, "--api-key", API_KEY, *engine_flags(**ENGINE_ARGS, tensor_parallel_size=tp))
    try:
        children = _descendants(server.proc.pid)
        assert len(children) >= (3 if tp > 1 else 2), "the engine (and its workers) should be running"
        sock = open_request(server, {**LONG, "max_tokens": 40, "stream": True})
        assert b"data: " in read_until(sock, b"data: ")
        server.proc.send_signal(sig)
        rest = read_until(sock, b"data: [DONE]")
        assert b"data: [DONE]" in rest and b'"finish_reason":"length"' in rest  # served to its end
        sock.close()
        assert server.proc.wait(60) == 0
        assert _gone(children), "child processes outlived the server"
    finally:
        server.stop()


@pytest.mark.slow
def test_killed_server_leaves_no_orphan(chat_ckpt):
    """kill -9 the server while a request runs: the engine process reads EOF on its command pipe and
    exits, and its tensor-parallel worker with it."""
    server = Server(chat_ckpt, "--api-key", API_KEY, *engine_flags(**ENGINE_ARGS, tensor_parallel_size=2))
    try:
        family, engine = _descendants(server.proc.pid), engine_pid(server)
        assert any("spawn_main" in _cmdline(p) for p in _children(engine)), "no tensor-parallel worker"
        sock = open_request(server, {**LONG, "stream": True})
        assert b"data: " in read_until(sock, b"data: ")
        server.proc.kill()
        sock.close()
        assert _gone(family), "the engine or its workers outlived a killed server"
    finally:
        server.stop()


def test_dead_engine_turns_health_503_and_fails_waiting_requests(chat_ckpt):
    server = Server(chat_ckpt, "--api-key", API_KEY, *engine_flags(**ENGINE_ARGS))
    try:
        engine = engine_pid(server)
        os.kill(engine, signal.SIGSTOP)  # the request below waits for the engine, which cannot answer
        sock = open_request(server, {**LONG, "stream": True})
        assert b" 200 OK" in read_until(sock, b"\r\n\r\n")  # the handler runs and waits
        os.kill(engine, signal.SIGKILL)
        rest = read_until(sock, b"data: [DONE]")
        sock.close()
        assert b"engine process died (killed by signal 9)" in rest, rest
        status, body, _ = curl(server.url + "/health")
        assert status == 503
        status, body, _ = curl(
            server.url + "/v1/completions", {"prompt": "hi"}, f"Authorization: Bearer {API_KEY}"
        )
        assert status == 503 and "restart the server" in body["error"]["message"], body
    finally:
        assert server.stop() == 0
