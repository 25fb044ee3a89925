"""``nanovllm bench-serve``: a serving benchmark in the shape of ``vllm bench serve``.

Starts ``nanovllm serve`` in a subprocess (or uses ``--base-url``), sends seeded random token-id
prompts as streaming completions at a Poisson rate (``inf``: all at once), and reports request
throughput, output tok/s and p50/p90/p99 of time to first token, time per output token and
inter-token latency. The same requests also go through offline ``LLM.generate`` before and after
each server run (never while a server is up, so the two never share the machine) as the same-run
baseline; the server's output tok/s at the highest load over their mean is the ratio the server
must keep >= 0.9. ``--runs N`` alternates: offline, then N times (server, offline). One JSON line
per run goes to ``--results``. The client is plain asyncio sockets, so it costs the server little CPU.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone

from nanovllm.server.bench_client import run_load


def make_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    hi = min(vocab, 10000) - 1
    return [
        ([rng.randint(100, hi) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
        for _ in range(n)
    ]


def offline_tok_s(model, engine_args: dict, requests, temperature: float) -> dict:
    """Offline ``LLM.generate`` on the same requests, in a fresh process (so that its GPU memory is
    gone before the server starts, and the two never share the machine)."""
    payload = json.dumps([model, engine_args, requests, temperature])
    out = subprocess.run(
        [sys.executable, "-m", "nanovllm.server.bench_serve", "--offline-json"],
        input=payload,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"offline generate exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _offline_main() -> None:
    from nanovllm import LLM, SamplingParams

    model, engine_args, requests, temperature = json.loads(sys.stdin.read())
    llm = LLM(model, **engine_args)
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=m) for _, m in requests]
    llm.generate([p for p, _ in requests[:2]], params[:2], use_tqdm=False)  # warm-up, as the server had
    # generate() runs in a thread, as the server's engine does: on a CPU machine shared with other
    # jobs, steps from the main thread ran 2-10x slower than from a thread (OpenMP under contention).
    outs, start = [], time.perf_counter()
    worker = threading.Thread(
        target=lambda: outs.extend(llm.generate([p for p, _ in requests], params, use_tqdm=False))
    )
    worker.start()
    worker.join()
    seconds = time.perf_counter() - start
    tokens = sum(len(o["token_ids"]) for o in outs)
    llm.shutdown()
    print(
        json.dumps(
            {
                "output_tok_per_s": round(tokens / seconds, 1),
                "seconds": round(seconds, 2),
                "output_tokens": tokens,
            }
        )
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str | None, engine_args: dict, port: int, server_flags: tuple[str, ...] = ()
) -> subprocess.Popen:
    flags = []
    for k, v in engine_args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):  # boolean flags take no value: --enforce-eager / --no-enforce-eager
            flags.append(flag if v else "--no-" + flag[2:])
        else:
            flags += [flag, str(v)]
    cmd = [sys.executable, "-m", "nanovllm", "serve", *([model] if model else []), "--port", str(port)]
    proc = subprocess.Popen(cmd + ["--log-level", "warning", *server_flags] + flags)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanovllm bench-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    p.add_argument("--base-url", default=None, help="use this running server (no offline baseline)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    p.add_argument("--request-rates", default="inf", help="comma-separated requests/s; inf = all at once")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-args", default="{}", help="JSON, e.g. '{\"max_model_len\": 2048}'")
    p.add_argument("--no-baseline", action="store_true", help="skip offline generate")
    p.add_argument("--runs", type=int, default=1, help="server runs, each between two offline runs")
    p.add_argument("--results", default=os.path.join("benchmarks", "results.jsonl"))
    p.add_argument("--note", default=None)
    p.add_argument(
        "--engines",
        default="process",
        help="comma-separated server designs to run in turn: process (the engine in its own process, "
        "the default) and/or thread (--engine-in-thread); each run gives one result line per design",
    )
    args = p.parse_args(argv)
    engine_args = json.loads(args.engine_args)

    from nanovllm.benchmark import _record, git_commit
    from nanovllm.models.registry import load_hf_config
    from nanovllm.utils.model_source import resolve_model

    model_path = resolve_model(args.model)
    vocab = load_hf_config(model_path).vocab_size
    requests = make_requests(
        args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed
    )
    rates = [float(r) for r in args.request_rates.split(",")]
    baseline = not args.no_baseline and not args.base_url
    workload = (
        f"{args.num_prompts} random token-id prompts (seed {args.seed}), input {args.input_len[0]}-"
        f"{args.input_len[1]}, output {args.output_len[0]}-{args.output_len[1]}, temperature "
        f"{args.temperature}, ignore_eos, streaming completions over HTTP"
    )
    head = {
        "bench": "serve",
        "device": _device(engine_args),
        "model": os.path.basename(model_path.rstrip("/")),
        "workload": workload,
        "engine_args": engine_args,
    }
    engines = args.engines.split(",")
    if not set(engines) <= {"process", "thread"}:
        p.error(f"--engines takes process and/or thread, got {args.engines!r}")
    # offline, then (server, offline) per run and design: each server run sits between two offline
    # runs, so that drift in the machine's speed shows, and the two never share the machine.
    offline = [offline_tok_s(args.model, engine_args, requests, args.temperature)] if baseline else []
    results = []
    for run, engine in ((r, e) for r in range(args.runs) for e in engines):
        loads = serve_load(args, engine_args, requests, rates, engine == "thread")
        result = {**head, "engine": engine, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        result.update(commit=git_commit(), server=loads, note=args.note, run=f"{run + 1}/{args.runs}")
        if baseline:
            offline.append(offline_tok_s(args.model, engine_args, requests, args.temperature))
            mean = (offline[-2]["output_tok_per_s"] + offline[-1]["output_tok_per_s"]) / 2
            result["baseline"] = {
                "offline_generate_before_and_after": offline[-2:],
                "mean_output_tok_per_s": round(mean, 1),
            }
            saturated = [load for load in loads if load["request_rate"] == "inf"] or loads
            result["server_over_offline"] = round(saturated[0]["output_tok_per_s"] / mean, 3)
        results.append(_record(result, args.results))
    for r in results:
        for load in r["server"]:
            offline = r.get("baseline", {}).get("mean_output_tok_per_s")
            busy, engine = load.get("event_loop_busy"), load.get("engine_process_busy")
            print(
                f"run {r['run']} engine in a {r['engine']}, rate {load['request_rate']}: server "
                f"{load['output_tok_per_s']} tok/s, event loop busy {busy}, engine process busy {engine}, "
                f"offline mean {offline} tok/s"
            )
    for engine in engines:
        ratios = [
            r["server_over_offline"] for r in results if r["engine"] == engine and "server_over_offline" in r
        ]
        if ratios:
            median = round(statistics.median(ratios), 3)
            print(f"server/offline output tok/s, engine in a {engine}: {ratios}, median {median}")
    return 0


def serve_load(
    args: argparse.Namespace, engine_args: dict, requests, rates: list[float], in_thread: bool = False
) -> list[dict]:
    """Start a server (or use ``--base-url``), warm it up, send the load once per rate, stop it."""
    proc = None
    if args.base_url:
        host, port = args.base_url.split("//")[-1].rstrip("/").split(":")
        port = int(port)
    else:
        host, port = "127.0.0.1", _free_port()
        flags = ("--engine-in-thread",) if in_thread else ()
        proc = start_server(args.model, engine_args, port, flags)
    try:
        asyncio.run(run_load(host, port, requests[:2], float("inf"), args.temperature, args.seed))  # warm-up
        loads = []
        for rate in rates:
            before = _cpu_seconds(proc)
            loads.append(asyncio.run(run_load(host, port, requests, rate, args.temperature, args.seed)))
            after = _cpu_seconds(proc)
            if before and after:  # what the load cost the server; the event loop is its main thread
                loop_s, total_s, engine_s = _cpu_used(proc.pid, before, after)
                tokens, seconds = max(1, loads[-1]["output_tokens"]), loads[-1]["seconds"]
                loads[-1].update(
                    server_cpu_s=round(total_s, 2),
                    event_loop_cpu_s=round(loop_s, 2),
                    event_loop_busy=round(loop_s / seconds, 3),
                    event_loop_us_per_token=round(1e6 * loop_s / tokens, 1),
                    engine_process_cpu_s=round(engine_s, 2),  # 0 with the engine in a thread
                    engine_process_busy=round(engine_s / seconds, 3),
                )
        return loads
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


def _cpu_seconds(proc: subprocess.Popen | None) -> tuple[dict[int, float], dict[int, float]] | None:
    """CPU seconds of each thread of the server and of its descendants (the engine process and its
    tensor-parallel workers), by thread id, from ``/proc/<pid>/task/<tid>/schedstat``: nanoseconds
    on a CPU, exact. (The clock-tick times of ``/proc/<pid>/stat`` are sampled and adjusted per
    task: over a small load the main thread read two ticks more than its whole process.)"""
    if proc is None:
        return None

    def on_cpu(pid: int) -> dict[int, float]:
        seconds = {}
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                seconds[int(task)] = int(f.read().split()[0]) / 1e9
        return seconds

    def descendants(pid: int) -> list[int]:
        kids = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        return kids + [d for k in kids for d in descendants(k)]

    try:
        engine = {tid: sec for d in descendants(proc.pid) for tid, sec in on_cpu(d).items()}
        return on_cpu(proc.pid), engine
    except (OSError, ValueError):
        return None


def _cpu_used(pid: int, before: tuple, after: tuple) -> tuple[float, float, float]:
    """CPU seconds between two ``_cpu_seconds`` readings: the server's main thread (its event loop),
    all its threads, its descendants' threads. A thread started in between counts from 0; one that
    ended in between drops out (never below 0), so the event loop never exceeds the server."""
    (server0, engine0), (server1, engine1) = before, after
    used = lambda t0, t1: sum(sec - t0.get(tid, 0.0) for tid, sec in t1.items())
    return server1[pid] - server0[pid], used(server0, server1), used(engine0, engine1)


def _device(engine_args: dict) -> str:
    import torch

    if engine_args.get("device") != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    if sys.argv[1:] == ["--offline-json"]:
        _offline_main()
    else:
        sys.exit(main())
