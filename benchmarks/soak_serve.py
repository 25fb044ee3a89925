"""Soak test of ``nanovllm serve`` on the CPU with a tiny random checkpoint.

1,000 requests from 48 concurrent clients: completions and chat, streamed or not, n of 1 or 2;
10% of clients drop the connection mid-stream; 5% send bad parameters (they must get a 400). The
server runs with --max-waiting-requests, so some 503s are intended (the client then waits 1 s,
as Retry-After says). Reported: every status by kind, unintended 5xx (must be 0), KV-cache usage
once idle (must be 0: no leaked blocks), and the RSS of the server and its engine process over
the run (must stay flat).
One JSON line goes to --results.

Usage (from the repository root): python benchmarks/soak_serve.py [--requests 1000]
"""

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.benchmark import _record, git_commit  # noqa: E402
from nanovllm.server.bench_serve import _free_port, start_server  # noqa: E402

ENGINE_ARGS = dict(
    max_model_len=256,
    kvcache_block_size=16,
    num_kvcache_blocks=128,
    max_num_seqs=16,
    max_num_batched_tokens=512,
)
BAD = [
    {"prompt": "hi", "top_p": 7},
    {"prompt": "hi", "max_tokens": 100000},
    {"prompt": "hi", "unknown_field": 1},
    {"prompt": [1, 10**6]},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    b'{"prompt": "hi", "max_tokens": ',
]


async def one(port: int, body: dict | bytes, path: str, drop_after: int | None) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    status = int((await reader.readline()).split()[1])
    seen = 0
    try:
        while chunk := await reader.read(65536):
            seen += chunk.count(b"data: ")
            if drop_after is not None and seen >= drop_after:
                return status, "dropped"
        return status, "done"
    finally:
        writer.close()


def rss_mib(pid: int) -> float:
    """Resident memory of the server and its descendants (the engine process)."""
    with open(f"/proc/{pid}/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return own + sum(rss_mib(k) for k in kids)


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        lines = r.read().decode().splitlines()
    return {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


async def soak(port: int, pid: int, n: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    unintended: list = []
    rss: list[float] = []
    queue = list(range(n))

    async def client():
        while queue:
            i = queue.pop()
            if i % 100 == 0:
                rss.append(round(rss_mib(pid), 1))
            r = rng.random()
            chat = rng.random() < 0.5
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = {"max_tokens": rng.randint(1, 64), "n": rng.choice([1, 1, 1, 2]), "temperature": 0.8}
            if chat:
                body["messages"] = [{"role": "user", "content": "word " * rng.randint(1, 40)}]
            else:
                body["prompt"] = [rng.randint(3, 300) for _ in range(rng.randint(1, 120))]
            kind, drop = "ok", None
            if r < 0.10:
                kind, drop, body["stream"], body["max_tokens"] = "disconnect", rng.randint(1, 4), True, 64
            elif r < 0.15:
                kind, body = "bad", rng.choice(BAD)
                path = (
                    "/v1/chat/completions"
                    if isinstance(body, dict) and "messages" in body
                    else "/v1/completions"
                )
            else:
                body["stream"] = rng.random() < 0.5
            status, how = await one(port, body, path, drop)
            outcomes[f"{kind}:{status}"] += 1
            expected = {"ok": (200, 503), "disconnect": (200, 503), "bad": (400,)}[kind]
            if status not in expected:
                unintended.append((kind, status, body if isinstance(body, dict) else body.decode()))
            if status == 503:
                await asyncio.sleep(1.0)  # as Retry-After asks

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "outcomes": dict(sorted(outcomes.items())),
        "unintended": unintended[:10],
        "num_unintended": len(unintended),
        "rss_mib_every_100": rss,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--max-waiting-requests", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=os.path.join("benchmarks", "results.jsonl"))
    args = p.parse_args()
    from tests.tiny import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(os.path.join(tmp, "tiny"), "qwen3")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt)
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        tok.save_pretrained(ckpt)
        port = _free_port()
        args_with_limit = {**ENGINE_ARGS, "max_waiting_requests": args.max_waiting_requests}
        proc = start_server(ckpt, args_with_limit, port)
        try:
            idle_before = metrics(port)
            report = asyncio.run(soak(port, proc.pid, args.requests, args.concurrency, args.seed))
            deadline = time.monotonic() + 60
            while (m := metrics(port))["vllm:num_requests_running"] + m["vllm:num_requests_waiting"] > 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            rss_end = round(rss_mib(proc.pid), 1)
        finally:
            proc.terminate()
            exit_code = proc.wait(60)
    result = {
        "bench": "serve_soak",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "commit": git_commit(),
        "device": f"cpu ({os.cpu_count()} cores)",
        "model": "tiny random qwen3",
        "workload": f"{args.requests} requests, {args.concurrency} concurrent clients, 10% disconnect "
        f"mid-stream, 5% bad parameters, --max-waiting-requests {args.max_waiting_requests}",
        "engine_args": ENGINE_ARGS,
        **report,
        "rss_mib_end": rss_end,
        "idle_before": {k: idle_before[k] for k in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running")},
        "idle_after": {
            k: m[k]
            for k in (
                "vllm:kv_cache_usage_perc",
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:generation_tokens_total",
            )
        },
        "server_exit_code": exit_code,
        "baseline": "idle_before: the same server's metrics before the first request",
    }
    _record(result, args.results)
    ok = result["num_unintended"] == 0 and m["vllm:kv_cache_usage_perc"] == 0 and exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
