"""Builders for paged-KV test cases: a cache whose blocks are handed out in shuffled order."""

import torch

from nanovllm.kernels.reference import FP8_DTYPE, V_SUB_BLOCK, quantize_fp8_ref, to_key_major

POISON = 1e4  # fills blocks no sequence owns: reading one by mistake shows up in the output


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def v_sub_block(block_size: int) -> int:
    """The V block of a key-major test cache: the engine's (reference.V_SUB_BLOCK) where the block
    is larger, else half the block from 32 slots up, so the small blocks the interpreter runs still
    split V into blocks of their own."""
    return V_SUB_BLOCK if block_size > V_SUB_BLOCK else max(16, block_size // 2)


def make_paged_kv(
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    pad: str = "poison",  # what fills block tables past each sequence's blocks: "poison", "-1" or "0"
    seed: int = 0,
    kv_scales: tuple[float, float] = (1.0, 1.0),  # an fp8 cache holds x / scale (poison saturates)
    v_key_major: bool = False,  # V laid out key-major (reference.key_major), as the GPU's fp8 cache
    stale: float = POISON,  # what fills V's slots past each sequence's end in its last block
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k_cache, v_cache, block_tables, context_lens; each sequence owns random, non-adjacent blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 2  # + a poisoned spare block and block 0 left unused
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON, dtype=torch.float32)
    v_cache = torch.full(shape, POISON, dtype=torch.float32)
    ids = (torch.randperm(num_blocks - 2, generator=gen) + 2).tolist()
    max_blocks = max(blocks_per_seq) + 1  # at least one padding entry per row
    pad_value = {"poison": 1, "-1": -1, "0": 0}[pad]
    block_tables = torch.full((len(context_lens), max_blocks), pad_value, dtype=torch.int32)
    for i, (n, nb) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        own, ids = ids[:nb], ids[nb:]
        block_tables[i, :nb] = torch.tensor(own, dtype=torch.int32)
        rows = torch.tensor(own, dtype=torch.long)  # empty for a row with no keys
        # Rows past context_len inside the last block stay poisoned too.
        k = torch.randn(nb * block_size, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(nb * block_size, num_kv_heads, head_dim, generator=gen)
        k[n:], v[n:] = POISON, stale
        k_cache[rows] = k.view(nb, block_size, num_kv_heads, head_dim)
        v_cache[rows] = v.view(nb, block_size, num_kv_heads, head_dim)
    dev = device()
    if dtype == FP8_DTYPE:
        k_cache = quantize_fp8_ref(k_cache, torch.tensor([kv_scales[0]]))
        v_cache = quantize_fp8_ref(v_cache, torch.tensor([kv_scales[1]]))
    v_cache = v_cache.to(dtype)
    if v_key_major:
        v_cache = to_key_major(v_cache, v_sub_block(block_size))
    return (
        k_cache.to(dtype).to(dev),
        v_cache.to(dev),
        block_tables.to(dev),
        torch.tensor(context_lens, dtype=torch.int32, device=dev),
    )
