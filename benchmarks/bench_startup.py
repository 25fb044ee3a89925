"""Command to first token on the CPU: `python -m nanovllm generate ...` spawned afresh, seconds until its
first streamed byte on stdout and until it exits; this checkout and a baseline checkout alternating.

    python benchmarks/bench_startup.py --baseline-dir /tmp/nanovllm-before --runs 5

Each run is a new process with the checkout on PYTHONPATH (its ``nanovllm`` package wins over the
installed one) and the same interpreter. The 1-minute load average is read before every run, since
on a shared machine it moves the figures more than anything measured here, and so are each process's
CPU seconds, which it moves less (``OMP_NUM_THREADS=1`` takes OpenMP's spinning out of them). Appends one
``cpu_command_to_first_token`` line to benchmarks/results.jsonl (``--no-record``: print it only).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "What is the capital of France?"
COMMAND = [sys.executable, "-m", "nanovllm", "generate", PROMPT, "--max-tokens", "16", "--temperature", "0"]


def one_run(checkout: str) -> tuple[float, float, float, str]:
    """(seconds to the first stdout byte, seconds to exit, CPU seconds, the output) of one fresh process.
    CPU seconds (user + system, all its threads) move less with the machine's load than wall time."""
    env = dict(os.environ, PYTHONPATH=checkout)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(
        COMMAND, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    rest, err = proc.communicate()
    exit_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{checkout}: exit {proc.returncode}\n{err.decode()[-2000:]}")
    return first_s, exit_s, cpu_s, (first + rest).decode()


def commit_of(checkout: str) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "-uno"], cwd=checkout, capture_output=True, text=True
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    """The model name and the widest vector extension, e.g. "AMD EPYC, AVX2"."""
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    widest = next((v for v in ("avx512f", "avx2") if v in flags), None)
    return f"{name}, {widest.upper().replace('F', '')}" if widest else name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-dir", default=None, help="a checkout of the baseline commit (git worktree)")
    p.add_argument("--runs", type=int, default=5, help="runs of each checkout, alternating (default 5)")
    p.add_argument("--no-record", action="store_true", help="print the JSON line without appending it")
    args = p.parse_args(argv)
    checkouts = {"ours": ROOT} | (
        {"baseline": os.path.abspath(args.baseline_dir)} if args.baseline_dir else {}
    )
    one_run(ROOT)  # untimed: brings the model file and the interpreter's modules into the page cache
    times: dict[str, dict[str, list]] = {
        k: {"first": [], "exit": [], "cpu": [], "load": []} for k in checkouts
    }
    outputs = {}
    for i in range(args.runs):
        order = list(checkouts) if i % 2 == 0 else list(reversed(checkouts))
        for name in order:
            load = os.getloadavg()[0]
            first, exit_s, cpu_s, outputs[name] = one_run(checkouts[name])
            for key, value in (("first", first), ("exit", exit_s), ("cpu", cpu_s), ("load", load)):
                times[name][key].append(round(value, 2))
            print(
                f"{name}: first byte {first:.2f} s, exit {exit_s:.2f} s, {cpu_s:.2f} CPU s (load {load:.2f})",
                file=sys.stderr,
            )
    record = {
        "bench": "cpu_command_to_first_token",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit_of(ROOT),
        "device": f"cpu ({os.cpu_count()} cores, {cpu_name()})",
        "workload": f"`python -m nanovllm generate {PROMPT!r} --max-tokens 16 --temperature 0`, seconds from "
        f"spawn to the first streamed byte; {args.runs} runs of each checkout, alternating, after one "
        "untimed warm-up run",
        "load_average_1min": times["ours"]["load"],
        "first_token_s": times["ours"]["first"],
        "median_first_token_s": statistics.median(times["ours"]["first"]),
        "exit_s": times["ours"]["exit"],
        "cpu_s": times["ours"]["cpu"],
        "threads_env": os.environ.get("OMP_NUM_THREADS"),
        "output": outputs["ours"].strip(),
    }
    if "baseline" in checkouts:
        b = times["baseline"]
        record |= {
            "baseline": f"the same command on {commit_of(checkouts['baseline'])}, alternating, same run",
            "baseline_load_average_1min": b["load"],
            "baseline_first_token_s": b["first"],
            "baseline_median_first_token_s": statistics.median(b["first"]),
            "baseline_exit_s": b["exit"],
            "baseline_cpu_s": b["cpu"],
            "baseline_output": outputs["baseline"].strip(),
        }
    line = json.dumps(record)
    print(line)
    if not args.no_record:
        with open(os.path.join(ROOT, "benchmarks", "results.jsonl"), "a") as f:
            f.write(line + "\n")
    return record


if __name__ == "__main__":
    main()
