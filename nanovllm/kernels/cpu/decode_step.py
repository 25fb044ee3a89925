"""All decoder layers of a decode step in one C call (decode_step.c): the lean CPU forward's decode path.

``DecodeStep`` is built once per model and KV cache from plain tensors (it keeps them alive and their
pointers in a ctypes array); each call passes only the step's tensors. Shapes are checked here, once,
so that a call costs one ctypes call and a few pointer reads.
"""

import ctypes
from dataclasses import dataclass

import torch

from nanovllm.kernels.cpu import build
from nanovllm.kernels.cpu.ops import QTYPE_IDS, QMatmul, _f32, kv_type_id


class _StepDims(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int) for name in ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "inter")),
        ("block_size", ctypes.c_int),
        ("max_blocks", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("kv_type", ctypes.c_int),
    ]


class _LayerPtrs(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("qkv", "o", "gate_up", "down")),
        *((f"qtype_{name}", ctypes.c_int) for name in ("qkv", "o", "gate_up", "down")),
        *((name, ctypes.c_void_p) for name in ("in_norm", "post_norm", "k_cache", "v_cache")),
    ]


@dataclass
class LayerTensors:
    """One decoder layer: its four quantised projections, the two norm weights float32 [hidden], and
    its KV cache [num_blocks, block_size, kv_heads, head_dim], float32 or float16 (every layer's the same:
    new K/V are rounded to nearest even when stored in a float16 cache, read back widened)."""

    qkv: QMatmul  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: QMatmul  # [hidden, heads * head_dim]
    gate_up: QMatmul  # [2 * inter, hidden]: gate rows, then up rows
    down: QMatmul  # [hidden, inter]
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def supported(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> bool:
    """The shapes decode_step.c takes: whole 32-blocks of hidden, inter and head_dim (its attention
    output is quantised head by head), head_dim <= 512, whole groups of query heads."""
    return not (hidden % 32 or inter % 32 or head_dim % 32 or head_dim > 512 or heads % kv_heads)


class DecodeStep:
    def __init__(
        self, layers: list[LayerTensors], heads: int, kv_heads: int, head_dim: int, eps: float, scale: float
    ):
        first = layers[0]
        hidden, inter = first.in_norm.numel(), first.down.k
        if not supported(hidden, heads, kv_heads, head_dim, inter):
            raise ValueError(f"decode_step does not take hidden {hidden}, inter {inter}, head_dim {head_dim}")
        qkv_n = (heads + 2 * kv_heads) * head_dim
        expected = {"qkv": (qkv_n, hidden), "o": (hidden, heads * head_dim), "gate_up": (2 * inter, hidden)}
        expected["down"] = (hidden, inter)
        self.keep, ptrs, kv_types = layers, (_LayerPtrs * len(layers))(), set()
        for lt, p in zip(layers, ptrs, strict=True):
            for name, (n, k) in expected.items():
                mm = getattr(lt, name)
                if (mm.n, mm.k) != (n, k):
                    raise ValueError(f"{name}: expected [{n}, {k}] weights, got [{mm.n}, {mm.k}]")
                setattr(p, name, mm.blocks.data_ptr())
                setattr(p, f"qtype_{name}", QTYPE_IDS[mm.qtype])
            for name in ("in_norm", "post_norm"):
                _f32(getattr(lt, name))
                setattr(p, name, getattr(lt, name).data_ptr())
            p.k_cache, p.v_cache = lt.k_cache.data_ptr(), lt.v_cache.data_ptr()
            kv_types.add(kv_type_id(lt.k_cache, lt.v_cache))
            if lt.k_cache.shape[2:] != (kv_heads, head_dim) or lt.v_cache.shape != lt.k_cache.shape:
                raise ValueError(f"KV cache {tuple(lt.k_cache.shape)} does not hold {kv_heads} x {head_dim}")
        if len(kv_types) > 1:
            raise ValueError("decode_step: the layers' KV caches differ in dtype; allocate them as one")
        self.layers, self.hidden = ptrs, hidden
        block_size = first.k_cache.shape[1]
        shape = (hidden, heads, kv_heads, head_dim, inter, block_size)
        self.dims = _StepDims(len(layers), *shape, 0, eps, scale, kv_types.pop())
        self.lib = build.load()
        self.work = torch.empty(0, dtype=torch.uint8)

    def __call__(
        self,
        residual: torch.Tensor,  # [m, hidden] float32: the embedded tokens; the last residual after
        cos_sin: torch.Tensor,  # [max_position, head_dim] float32: [cos | sin] per position
        positions: torch.Tensor,  # [m] int64
        slots: torch.Tensor,  # [m] int64: each new token's cache slot (< 0: not stored)
        block_tables: torch.Tensor,  # [m, max_blocks] int32
        context_lens: torch.Tensor,  # [m] int32, the new token included
        final_norm: torch.Tensor,  # [hidden] float32
        threads: int | None = None,
    ) -> torch.Tensor:  # [m, hidden] float32: the final norm's output
        m = residual.shape[0]
        _f32(residual, cos_sin, final_norm)
        if residual.shape[1:] != (self.hidden,) or final_norm.numel() != self.hidden:
            raise ValueError(f"expected residual [m, {self.hidden}] and final_norm [{self.hidden}]")
        positions, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
        block_tables = block_tables.to(torch.int32).contiguous()
        context_lens = context_lens.to(torch.int32).contiguous()
        if not (positions.numel() == slots.numel() == context_lens.numel() == block_tables.shape[0] == m):
            raise ValueError("decode_step: positions, slots, block_tables, context_lens: not one row each")
        if cos_sin.shape[1] != self.dims.head_dim:
            raise ValueError(f"decode_step: cos_sin must be [max_position, {self.dims.head_dim}]")
        max_len = int(context_lens.max()) if m else 0
        if m and int(positions.max()) >= cos_sin.shape[0]:
            raise IndexError(f"position {int(positions.max())} is past the rotary cache ({cos_sin.shape[0]})")
        if max_len > block_tables.shape[1] * self.dims.block_size:
            raise ValueError(f"context of {max_len} tokens does not fit {block_tables.shape[1]} blocks")
        threads = threads or torch.get_num_threads()
        self.dims.max_blocks = block_tables.shape[1]
        need = self.lib.decode_step_workspace(ctypes.byref(self.dims), m, max_len, threads)
        if self.work.numel() < need:
            self.work = torch.empty(need * 5 // 4, dtype=torch.uint8)
        out = torch.empty(m, self.hidden)
        if m:
            rc = self.lib.decode_step(
                ctypes.byref(self.dims), self.layers, residual.data_ptr(), cos_sin.data_ptr(),
                positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(), m,
                final_norm.data_ptr(), out.data_ptr(), self.work.data_ptr(), threads,
            )  # fmt: skip
            if rc != 0:
                raise ValueError("decode_step rejected the model's shapes")
        return out
