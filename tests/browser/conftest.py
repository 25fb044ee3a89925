"""The chat page in a real headless Chromium, against a real ``nanovllm serve`` on a free port.

Chromium comes from the distribution (``apt-get install chromium``); without it every test here
skips and says so. The browser is driven over the DevTools protocol (tests/browser/cdp.py).
"""

import json
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.browser.cdp import Browser, find_chromium
from tests.server.conftest import Server, chat_ckpt, engine_flags  # noqa: F401 (chat_ckpt: a fixture)

pytest.importorskip("websockets", reason="the browser tests need websockets: pip install -e '.[test]'")

API_KEY = "page-key"
# Room for a long reply (the Stop test): contexts of 1024 tokens, 80 blocks of 16.
ENGINE_ARGS = dict(
    max_model_len=1024, kvcache_block_size=16, num_kvcache_blocks=80, max_num_batched_tokens=1024
)
STATIC_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "nanovllm", "server", "static")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    chromium = find_chromium()
    for item in items:
        if str(item.fspath).startswith(here):
            if chromium is None:
                item.add_marker(
                    pytest.mark.skip(
                        reason="no Chromium found: apt-get install chromium (or set NANOVLLM_CHROMIUM)"
                    )
                )


@pytest.fixture(scope="session")
def browser():
    b = Browser(find_chromium())
    yield b
    b.close()


@pytest.fixture(scope="session")
def page_server(chat_ckpt):  # noqa: F811
    """A real server with an API key, so that the page must ask for it."""
    s = Server(chat_ckpt, "--api-key", API_KEY, *engine_flags(**ENGINE_ARGS))
    yield s
    assert s.stop() == 0


@pytest.fixture
def page(browser, page_server):
    """The chat page freshly loaded, the API key given, the model name shown."""
    open_page(browser, page_server.url)
    yield browser
    assert browser.errors == [], "uncaught exceptions in the page"


def open_page(browser: Browser, url: str, api_key: str = API_KEY) -> None:
    """Load the page; give the API key if it asks for one; wait for the model name."""
    browser.open(url + "/")
    model_state = "document.getElementById('model').dataset.state"
    if browser.wait(model_state) == "key":
        browser.type("#api-key", api_key)
        browser.press_enter()
    assert browser.wait(f"{model_state} !== 'key' && {model_state}") == "ready"


def post_json(url: str, body: dict, api_key: str = API_KEY) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


class ScriptedServer:
    """A plain HTTP server that serves the page's files and answers the chat route with a reply
    chosen by the last user message: crafted SSE content, a 503, or a connection cut mid-reply.
    It stands in for states the real server reaches only by accident (busy, crashed)."""

    def __init__(self, replies: dict[str, list[str] | int | None]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Connection", "close")  # no kept-alive socket outlives close()
                self.close_connection = True
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    card = {"id": "scripted", "object": "model", "max_model_len": 64}
                    return self._send(200, json.dumps({"data": [card]}).encode(), "application/json")
                name = "index.html" if self.path == "/" else self.path.removeprefix("/static/")
                if not os.path.isfile(os.path.join(STATIC_DIR, name)):
                    return self._send(404, b"{}", "application/json")
                ctype = {"html": "text/html", "js": "text/javascript", "css": "text/css"}[name.split(".")[-1]]
                with open(os.path.join(STATIC_DIR, name), "rb") as f:
                    self._send(200, f.read(), ctype)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                reply = outer.replies[body["messages"][-1]["content"]]
                if isinstance(reply, int):
                    error = {"error": {"message": "the server is busy", "type": "server_error"}}
                    return self._send(
                        reply, json.dumps(error).encode(), "application/json", {"Retry-After": "1"}
                    )
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for piece in reply or ["a partial rep"]:
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if reply is None:  # cut: the connection closes without finish_reason or [DONE]
                    return
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                usage = {"choices": [], "usage": {"completion_tokens": len(reply)}}
                self.wfile.write(
                    f"data: {json.dumps(end)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
                )

        self.replies, self.requests = replies, []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
