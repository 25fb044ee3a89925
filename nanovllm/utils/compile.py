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
    warmed: set[int] = set()  # ranks of x already compiled for one row and for several
    disabled = os.environ.get("NANOVLLM_NO_COMPILE") == "1"

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        nonlocal compiled
        if disabled or not x.is_cuda:
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        if x.dim() not in warmed:
            warmed.add(x.dim())
            _warm_row_counts(compiled, x, args)
        return compiled(x, *args)

    return wrapper


def _warm_row_counts(compiled, x: torch.Tensor, args: tuple) -> None:
    """Compile for several rows and for one. Dynamic shapes still specialise a size of 1, so the
    first one-row call (a lone prompt token, a small eager step) would otherwise recompile (~1 s on
    an H200) in the middle of serving. Tensor arguments shaped like ``x`` are sliced with it."""
    for rows in (2, 1):
        if x.shape[0] < rows:
            continue
        sliced = [_rows(a, x, rows) for a in args]
        compiled(x[:rows], *sliced)


def _rows(a, x: torch.Tensor, rows: int):
    if isinstance(a, torch.Tensor) and a.dim() == x.dim() and a.shape[0] == x.shape[0]:
        return a[:rows]
    return a
