"""The engine with the Triton backend on the CPU, its kernels under Triton's interpreter: the split and
the flat decode kernels (NANOVLLM_DECODE, layers/attention_triton.py) give the torch backend's greedy
tokens, through decode steps and mixed ones (a 40-token budget chunks the 70-token prompt beside the
decodes). The same engines on a GPU, with CUDA graphs: tests/gpu/test_engine_gpu.py."""

import os

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    # The interpreter trips a numpy deprecation on every scalar branch of a kernel (as in tests/kernels).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU: tests/gpu/test_engine_gpu.py"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter"),
]

PROMPTS = [[3 + (7 * i + j) % 300 for j in range(n)] for i, n in enumerate((1, 9, 16, 17, 40, 70))]
ENGINE = dict(dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_batched_tokens=40,
              num_kvcache_blocks=64)  # fmt: skip


@pytest.fixture
def engine(tiny_ckpt, monkeypatch):
    """Start an engine on the tiny model with the Triton backend (the CPU's default is torch) and
    NANOVLLM_DECODE set to ``decode``, or the torch backend for ``decode=None``. Each start first
    undoes the settings of the one before."""
    import nanovllm.engine.model_runner as model_runner
    from nanovllm.layers import attention_triton

    def start(decode: str | None, **kwargs) -> LLM:
        monkeypatch.undo()
        if decode is not None:
            monkeypatch.setattr(model_runner, "get_backend", lambda *a, **kw: attention_triton.TritonBackend)
            monkeypatch.setenv("NANOVLLM_DECODE", decode)
        attention_triton.flat_setting.cache_clear()
        return LLM(tiny_ckpt("qwen3"), **ENGINE, **kwargs)

    yield start
    monkeypatch.undo()
    attention_triton.flat_setting.cache_clear()


def greedy(llm: LLM) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with llm:
        return [o["token_ids"] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_split_and_flat_decode_give_the_torch_backends_tokens(engine, monkeypatch):
    from nanovllm.layers import attention_triton

    torch_tokens = greedy(engine(None))
    split = engine("split")
    assert split.engine.executor.inputs.flat_plan is None
    assert greedy(split) == torch_tokens
    flat = engine("flat")
    assert flat.engine.executor.inputs.flat_plan is not None
    rows = []  # the decode rows of each flat kernel call: decode steps and the decodes of mixed steps
    real = attention_triton.flat_decode_attention
    monkeypatch.setattr(
        attention_triton,
        "flat_decode_attention",
        lambda q, *a, **kw: rows.append(len(q)) or real(q, *a, **kw),
    )
    assert greedy(flat) == torch_tokens
    assert max(rows) == len(PROMPTS) and min(rows) < len(PROMPTS), rows


def test_split_and_flat_decode_agree_on_an_fp8_cache(engine):
    assert greedy(engine("flat", kv_cache_dtype="fp8")) == greedy(engine("split", kv_cache_dtype="fp8"))
