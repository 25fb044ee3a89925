"""The serving benchmark's load generator: streaming completions over plain asyncio sockets (so the
client costs the server little CPU), sent at a Poisson rate, and their latency percentiles."""

import asyncio
import json
import time

import numpy as np


async def _post_stream(host: str, port: int, body: dict) -> dict:
    """One streaming completion over a fresh connection: timestamps of each content chunk."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    times, usage = [], None
    while status == 200:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        chunk = (await reader.readexactly(size + 2))[:-2]
        now = time.perf_counter()
        # Only the usage event is parsed: a JSON parse of every chunk would make the client, not the
        # server, the bottleneck at hundreds of streams (the server writes compact JSON).
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"choices":[{' in event:
                times.append(now)  # a step's tokens (text may be empty: no tokenizer, or a split character)
            elif event.startswith(b"data: {") and b'"usage":{' in event:
                usage = json.loads(event[6:])["usage"]
    writer.close()
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {
        "ok": status == 200 and usage is not None,
        "start": start,
        "end": end,
        "times": times,
        "tokens": tokens,
    }


async def run_load(host: str, port: int, requests, rate: float, temperature: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tasks = []
    t0 = time.perf_counter()
    for prompt, max_tokens in requests:
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tasks.append(asyncio.create_task(_post_stream(host, port, body)))
        if rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["times"][0] - r["start"] for r in ok if r["times"]]
    tpot = [(r["end"] - r["times"][0]) / (r["tokens"] - 1) for r in ok if r["times"] and r["tokens"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    out_tokens = sum(r["tokens"] for r in ok)

    def pct(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {}
        p = np.percentile(np.array(xs) * 1000, [50, 90, 99])
        return {
            "mean_ms": round(float(np.mean(xs)) * 1000, 2),
            **{f"p{q}_ms": round(float(v), 2) for q, v in zip((50, 90, 99), p, strict=True)},
        }

    return {
        "request_rate": "inf" if rate == float("inf") else rate,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "seconds": round(duration, 2),
        "request_per_s": round(len(ok) / duration, 3),
        "output_tok_per_s": round(out_tokens / duration, 1),
        "output_tokens": out_tokens,
        "ttft": pct(ttft),
        "tpot": pct(tpot),
        "itl": pct(itl),
    }
