"""A real ``nanovllm serve`` in a subprocess on a free port, with a tiny random checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "test-key"
# Small on purpose: 64 blocks of 16 tokens, and prompts + outputs up to 256 tokens.
ENGINE_ARGS = dict(  # float32 on every CPU: logprobs are checked against HF's float32
    max_model_len=256,
    kvcache_block_size=16,
    num_kvcache_blocks=64,
    max_num_batched_tokens=512,
    dtype="float32",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(**args) -> list[str]:
    return [x for k, v in args.items() for x in ("--" + k.replace("_", "-"), str(v))]


class Server:
    def __init__(self, model: str | None, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "nanovllm",
            "serve",
            *([model] if model else []),
            "--port",
            str(self.port),
        ]
        self.log = open(os.devnull, "w") if not os.environ.get("NANOVLLM_SERVER_LOG") else None
        self.proc = subprocess.Popen(cmd + list(flags), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the server did not become healthy in 120 s")
            time.sleep(0.2)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples without labels: {'vllm:num_requests_running': 0.0, ...}."""
        out = {}
        for line in self.get("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out.setdefault(name.split("{")[0], float(value))
        return out

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits; return the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (0, 0):
                return m
            if time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            if self.log is not None:
                self.log.close()


def curl(url: str, body: object = None, *headers: str, raw: bytes | None = None) -> tuple[int, dict, dict]:
    """POST (or GET without a body) with curl; returns (status, JSON body or {}, headers)."""
    cmd = ["curl", "-sS", "-D", "-", url, "-H", "Content-Type: application/json"]
    for h in headers:
        cmd += ["-H", h]
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    if data is not None:
        cmd += ["--data-binary", "@-"]
    out = subprocess.run(cmd, input=data, capture_output=True, check=True, timeout=60).stdout.decode()
    head, _, text = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, json.loads(text) if text.strip() else {}, hdrs


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> str:
    """A tiny random Qwen3 whose tokenizer has a (made-up) chat template."""
    from transformers import AutoTokenizer

    from tests.tiny import make_checkpoint

    path = make_checkpoint(str(tmp_path_factory.mktemp("serve_qwen3")), "qwen3")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def server(chat_ckpt):
    """One server for the API tests: API key on, a 64 KiB body limit."""
    s = Server(chat_ckpt, "--api-key", API_KEY, "--max-body-bytes", "65536", *engine_flags(**ENGINE_ARGS))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def reference(chat_ckpt):
    """The offline engine on the same checkpoint and engine arguments: what the server must match."""
    from nanovllm import LLM

    llm = LLM(chat_ckpt, **ENGINE_ARGS)
    yield llm
    llm.shutdown()
