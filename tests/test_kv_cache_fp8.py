"""kv_cache_dtype='fp8' through the engine on tiny random checkpoints: checked up front, half (or a
quarter) the bytes per block, close to the model-dtype cache, and unchanged by prefix-cache hits,
preemption and tensor parallelism. Real-weight quality: tests/models/test_kv_cache_fp8_quality.py."""

import pytest
import torch

from nanovllm import LLM, SamplingParams

ENGINE = dict(kvcache_block_size=16, max_model_len=256, dtype="float32")  # the same on every CPU
GREEDY = SamplingParams(temperature=0, max_tokens=16, logprobs=0)


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, 384) for _ in range(length)] for length in (1, 7, 16, 17, 40, 90)]


def generate(llm: LLM) -> list[dict]:
    return llm.generate(prompts(), GREEDY, use_tqdm=False)


@pytest.fixture(scope="module")
def fp8_tokens(tiny_ckpt):
    """Greedy tokens of one rank with an fp8 cache and scales 1.0: what the other set-ups must match."""
    with LLM(tiny_ckpt("qwen3"), kv_cache_dtype="fp8", **ENGINE) as llm:
        return [o["token_ids"] for o in generate(llm)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
        (dict(kv_cache_dtype="fp8", attention_backend="flash-attn"), "flash-attn backend cannot read an fp8"),
        (dict(calculate_kv_scales="yes"), "calculate_kv_scales must be True or False"),
    ],
)
def test_bad_kv_cache_arguments_fail_at_start(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_ckpt("qwen3"), **kwargs)


def test_fp8_cache_counts_one_byte_per_element(tiny_ckpt):
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        for kv in ("auto", "fp8"):
            engine = ENGINE | dict(dtype=dtype, kv_cache_dtype=kv, num_kvcache_blocks=32)
            with LLM(tiny_ckpt("qwen3"), **engine) as llm:
                runner = llm.engine.executor
                sizes[dtype, kv] = runner.block_bytes
                assert runner.kv_cache.dtype == (
                    torch.float8_e4m3fn if kv == "fp8" else getattr(torch, dtype)
                )
    # 2 layers x (K, V) x 16 tokens x 2 KV heads x head_dim 16 elements per block
    assert sizes["float32", "fp8"] == sizes["bfloat16", "fp8"] == 2 * 2 * 16 * 2 * 16
    assert sizes["float32", "auto"] == 4 * sizes["float32", "fp8"]
    assert sizes["bfloat16", "auto"] == 2 * sizes["bfloat16", "fp8"]


def test_fp8_close_to_the_model_dtype_cache(tiny_ckpt, fp8_tokens):
    """The first token's logprob (prefill only, same prompt on both sides) moves by fp8 rounding
    alone: 3 mantissa bits, up to ~0.2 nats on these wide-weight models, whose flat distributions
    (about -2.3 for the chosen token) make later greedy tokens flip easily, so those are not compared.
    A wrong dequantisation (a scale off by 10x) moves it by several nats."""
    with LLM(tiny_ckpt("qwen3"), **ENGINE) as llm:
        ref = generate(llm)
    with LLM(tiny_ckpt("qwen3"), kv_cache_dtype="fp8", **ENGINE) as llm:
        out = generate(llm)
    assert [o["token_ids"] for o in out] == fp8_tokens  # deterministic
    diffs = [
        abs(o["logprobs"][0].get(r["token_ids"][0], -100.0) - r["logprobs"][0][r["token_ids"][0]])
        for o, r in zip(out, ref, strict=True)
        if o["token_ids"][0] == r["token_ids"][0]
    ]
    assert len(diffs) >= 5 and max(diffs) < 0.4 and sum(diffs) / len(diffs) < 0.2


@pytest.mark.slow
def test_fp8_prefix_cache_hits_and_preemption_give_the_same_tokens(tiny_ckpt, fp8_tokens):
    with LLM(tiny_ckpt("qwen3"), kv_cache_dtype="fp8", **ENGINE) as llm:
        generate(llm)
        again = generate(llm)  # prefix-cache hits: cached fp8 blocks are read back
    assert any(o["num_cached_tokens"] > 0 for o in again)
    assert [o["token_ids"] for o in again] == fp8_tokens
    tight = dict(kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=9, dtype="float32")
    with LLM(tiny_ckpt("qwen3"), kv_cache_dtype="fp8", **tight) as llm:
        out = generate(llm)
        assert llm.engine.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in out] == fp8_tokens


def test_calibrated_scales_come_from_the_first_prefill_only(tiny_ckpt):
    from nanovllm.layers.kv_quant import CALIBRATION_HEADROOM

    with LLM(tiny_ckpt("qwen3"), kv_cache_dtype="fp8", calculate_kv_scales=True, **ENGINE) as llm:
        layers = llm.engine.executor.attention_layers
        assert all(layer.k_scale.item() == 1.0 for layer in layers)
        first = generate(llm)
        scales = [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers]
        generate(llm)
        assert scales == [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers]
    # The tiny model's K and V reach a few units: the scales map that to 448 / headroom.
    for k_scale, v_scale in scales:
        for s in (k_scale, v_scale):
            assert 0.1 / 448 < s / CALIBRATION_HEADROOM < 100 / 448
    assert all(len(o["token_ids"]) == 16 for o in first)


@pytest.mark.slow
def test_fp8_tensor_parallel_matches_one_rank(tiny_ckpt, fp8_tokens):
    """Scales 1.0 on every rank: each rank quantises its own KV heads exactly as one rank would."""
    with LLM(tiny_ckpt("qwen3"), kv_cache_dtype="fp8", tensor_parallel_size=2, **ENGINE) as llm:
        out = generate(llm)
    assert [o["token_ids"] for o in out] == fp8_tokens


@pytest.mark.gpu
def test_fp8_with_cuda_graphs_matches_eager(tiny_ckpt):
    """Decode replayed from CUDA graphs reads the same fp8 cache and (calibrated) scale tensors."""
    results = []
    for eager in (True, False):
        engine = ENGINE | dict(dtype="bfloat16", enforce_eager=eager, kv_cache_dtype="fp8",
                               calculate_kv_scales=True, num_kvcache_blocks=64)  # fmt: skip
        with LLM(tiny_ckpt("qwen3"), **engine) as llm:
            assert bool(llm.engine.executor.graphs) is not eager
            assert llm.engine.executor.backend.name == "triton"
            v_cache = llm.engine.executor.attention_layers[0].v_cache
            assert v_cache.stride(1) == 1  # V key-major: what the Triton kernels read fastest
            results.append([o["token_ids"] for o in generate(llm)])
    assert results[0] == results[1]
