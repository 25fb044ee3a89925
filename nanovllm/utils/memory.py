"""How big the KV cache may be on a CPU, where it shares the machine's memory with everything else."""

import math

CPU_KV_CACHE_CAP_BYTES = 384 << 20  # 33 blocks of 256 tokens of SmolLM2-135M in float32: a batch of 32
CPU_KV_CACHE_MEMORY_SHARE = 0.5  # never more than this share of the memory available now


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (allocatable without swapping), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_kv_cache_blocks(
    block_bytes: int, block_size: int, max_num_seqs: int, max_model_len: int, available: int | None = None
) -> int:
    """Blocks for the CPU KV cache: what ``max_num_seqs`` sequences of ``max_model_len`` tokens could use,
    capped at CPU_KV_CACHE_CAP_BYTES and at half the available memory, but never fewer than one full
    sequence needs. A CPU decodes a few dozen sequences at a time at best, so the cap costs no speed,
    and the default chat model stays well under 1 GiB of resident memory.

    Raises ValueError when even one sequence of ``max_model_len`` does not fit in the available memory.
    """
    available = available_memory_bytes() if available is None else available
    per_seq = math.ceil(max_model_len / block_size)
    needed = max_num_seqs * per_seq
    budget = min(CPU_KV_CACHE_CAP_BYTES, int(available * CPU_KV_CACHE_MEMORY_SHARE))
    blocks = min(needed, max(per_seq, budget // block_bytes))
    if blocks * block_bytes > available * 0.9:
        raise ValueError(
            f"one sequence of max_model_len={max_model_len} needs a {per_seq * block_bytes / 2**30:.2f} GiB "
            f"KV cache but only {available / 2**30:.2f} GiB of memory is available; lower max_model_len"
        )
    return blocks


def lazily_zeroed_cpu_tensor(shape: tuple[int, ...], dtype):
    """A zero-filled CPU tensor whose pages the OS zeroes on first touch: an anonymous memory map, where
    torch.zeros writes every byte up front (a 384 MiB KV cache: 0.4-1.3 s of a 2-core machine's start-up,
    and all of it resident at once). Not numpy's zeros: numpy asks for transparent huge pages on large
    blocks, and a first touch of each 2 MiB page (one per layer's K and V in the first prefill) then
    zeroes it whole, often after compacting memory: measured 0.1-0.36 s of the first step, 2 ms here."""
    import mmap

    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)  # keeps the map alive
    return raw[:nbytes].view(dtype).view(shape)
