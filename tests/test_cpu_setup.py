"""CPU set-up decisions: quantization argument, KV-cache sizing policy, physical cores, dtype default."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanovllm.config import Config
from nanovllm.utils.cpu import has_native_bf16, physical_cores
from nanovllm.utils.memory import CPU_KV_CACHE_CAP_BYTES, cpu_kv_cache_blocks


def test_quantization_is_validated(tiny_ckpt):
    with pytest.raises(ValueError, match="quantization must be one of"):
        Config.from_kwargs(tiny_ckpt("qwen3"), quantization="int3")
    with pytest.raises(ValueError, match="needs a .gguf model.*quantization=None"):
        Config.from_kwargs(tiny_ckpt("qwen3"), device="cpu", quantization="gguf")


def test_safetensors_model_is_not_packed_and_cpu_dtype_follows_the_cpu(tiny_ckpt):
    config = Config.from_kwargs(tiny_ckpt("qwen3"), device="cpu")
    assert config.quantization is None and config.hf_config.packed_modules == {}
    assert config.dtype == ("bfloat16" if has_native_bf16() else "float32")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_packed_gguf_runs_in_float32_whatever_the_cpu(monkeypatch, native_bf16):
    """The C kernels take float32 rows and weights: with native bfloat16 the default once became
    bfloat16 and the bundled model failed at its first step. An explicit bfloat16 still runs (the
    lean torch path), with the same greedy reply to a short prompt."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.utils import cpu
    from tests.models.smollm2 import SMOLLM2

    if SMOLLM2 is None:
        pytest.skip("the bundled SmolLM2 is not installed")
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: native_bf16)
    assert Config.from_kwargs(SMOLLM2, device="cpu").dtype == "float32"
    sp = SamplingParams(temperature=0, max_tokens=6)
    replies = []
    for dtype in ("auto", "bfloat16"):
        with LLM(SMOLLM2, dtype=dtype, max_model_len=256) as llm:
            replies.append(llm.generate(["The capital of France is"], sp, use_tqdm=False)[0]["token_ids"])
    assert replies[0] == replies[1]


def test_physical_cores_is_within_the_logical_count():
    import os

    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


MiB = 1 << 20


@given(
    block_bytes=st.integers(1 * MiB, 64 * MiB),
    block_size=st.sampled_from([16, 64, 256]),
    max_num_seqs=st.integers(1, 512),
    max_model_len=st.integers(16, 8192),
    available=st.integers(256 * MiB, 64 << 30),
)
def test_kv_cache_policy(block_bytes, block_size, max_num_seqs, max_model_len, available):
    per_seq = -(-max_model_len // block_size)
    try:
        blocks = cpu_kv_cache_blocks(block_bytes, block_size, max_num_seqs, max_model_len, available)
    except ValueError as e:  # refused only when one sequence would not fit in 90% of the memory
        assert per_seq * block_bytes > 0.9 * available and "lower max_model_len" in str(e)
        return
    assert per_seq <= blocks <= max_num_seqs * per_seq  # one full sequence at least, never more than usable
    assert blocks == per_seq or blocks * block_bytes <= min(CPU_KV_CACHE_CAP_BYTES, available // 2)


def test_kv_cache_for_the_default_chat_model_stays_small():
    # SmolLM2-135M in float32: 30 layers x K,V x 3 heads x 64 x 4 bytes per token, blocks of 256
    block_bytes = 30 * 2 * 3 * 64 * 4 * 256
    blocks = cpu_kv_cache_blocks(block_bytes, 256, 512, 4096, available=16 << 30)
    assert blocks * block_bytes <= CPU_KV_CACHE_CAP_BYTES and blocks * 256 >= 8192


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float8_e4m3fn"])
def test_the_cpu_kv_cache_is_zero_without_being_written(dtype_name):
    """The CPU KV cache reads as zeros (the torch backend multiplies unwritten slots by zero weights),
    and its pages become resident only when touched: nothing writes 384 MiB at start-up."""
    import torch

    from nanovllm.utils.memory import lazily_zeroed_cpu_tensor

    dtype = getattr(torch, dtype_name)
    shape = (2, 4, 64, 256, 2, 64)  # 256 MiB at 4 bytes an element
    before = _resident_bytes()
    kv = lazily_zeroed_cpu_tensor(shape, dtype)
    assert kv.shape == shape and kv.dtype == dtype and kv.is_contiguous()
    assert _resident_bytes() - before < (kv.numel() * dtype.itemsize) // 8
    kv[1, 3, 63].fill_(1.0)
    assert kv[1, 3, 63].float().sum().item() == 256 * 2 * 64
    assert kv[0, :, :4].float().abs().sum().item() == 0 and kv[1, 2].float().abs().sum().item() == 0
