"""Which Triton kernels are built (or loaded from Triton's disk cache) during the benchmark's timed
run: every such build stalls a step. Runs ``bench.py``'s throughput workload in this process with
Triton's JIT cache hook installed and prints each kernel variant the first time it is launched, with
the phase it fell in (``start-up``, the ``warm-up`` generate, or ``timed``: everything after it, so
pass ``--no-latency``) and its specialisation key (argument types, alignment, constexprs), so two
variants of one kernel can be told apart.

    python benchmarks/triton_builds.py --ckpt-dir /tmp/ck --no-latency [other bench.py arguments]
"""

import sys
import time

import triton

from nanovllm import LLM
from nanovllm.benchmark import main

phase = ["start-up"]
builds: list[tuple[str, float, str, str]] = []
start = time.perf_counter()


def on_build(*, key, repr, fn, **_):
    builds.append((phase[0], time.perf_counter() - start, fn.name, str(key)))
    print(f"[triton build] {phase[0]:8s} {time.perf_counter() - start:8.2f}s {fn.name} {key}", flush=True)
    return False  # go on and build (a true value would skip the launch)


real_generate = LLM.generate


def generate(self, *args, **kwargs):
    """The benchmark's one ``generate`` is its warm-up; the timed run that follows drives steps."""
    phase[0] = "warm-up"
    try:
        return real_generate(self, *args, **kwargs)
    finally:
        phase[0] = "timed"


if __name__ == "__main__":
    triton.knobs.runtime.jit_cache_hook = on_build
    LLM.generate = generate
    main(sys.argv[1:] + ["--results", "/dev/null"])
    timed = [b for b in builds if b[0] == "timed"]
    print(f"[triton build] {len(builds)} variants in all, {len(timed)} first launched inside the timed run:")
    for _, at, name, key in timed:
        print(f"  {at:8.2f}s {name} {key}")
