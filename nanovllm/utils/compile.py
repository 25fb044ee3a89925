"""``torch.compile`` for the small elementwise layers, on CUDA only.

Unfused, one decode step of a 28-layer model launches ~1,400 tiny kernels (each norm, rotary and
activation is several), and at small batch their launch latency, not memory traffic, sets the
step time. Compiled, each of these functions becomes one fused Triton kernel. On the CPU (and in
CI) the plain function runs: compiling there costs time and buys little.
"""

import functools
import os

import torch


def compile_on_cuda(fn):
    """Run ``fn`` compiled (dynamic shapes) when its first argument is a CUDA tensor."""
    compiled = None
    disabled = os.environ.get("NANOVLLM_NO_COMPILE") == "1"

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        nonlocal compiled
        if disabled or not x.is_cuda:
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args)

    return wrapper
