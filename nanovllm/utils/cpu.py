"""What the CPU offers: bfloat16 arithmetic, physical cores; and the engine's thread count from them."""

import logging
import os
from functools import lru_cache

logger = logging.getLogger("nanovllm")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    """True where bfloat16 matmuls run in hardware: AVX512-BF16 or AMX (x86), or on Apple/ARM BF16."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def physical_cores() -> int:
    """Physical cores this process may run on (its affinity mask, SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f1, open(f"{base}/core_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def set_cpu_threads() -> int:
    """Use one torch thread per physical core, unless OMP_NUM_THREADS says otherwise.

    A decode step is bound by memory bandwidth and by many small ops; a second hyper-thread on a core
    shares its caches and load ports and adds synchronisation to every op, so it does not pay."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
