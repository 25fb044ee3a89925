"""The server process rebuilds each request's outputs from the engine process's per-step tuples and
detokenizes them itself: the streamed text must add up to the tokenizer's decode of the tokens."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.output_builder import OutputBuilder

_TOKENIZERS = {}


def tokenizer(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


steps = st.lists(st.lists(st.integers(3, 383), max_size=4), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=steps, b=steps)
def test_streamed_text_and_tokens_add_up(tiny_ckpt, a, b):
    """Two completions (n=2) that finish at different steps, with logprobs."""
    tok = tokenizer(tiny_ckpt("qwen3"))
    builder = OutputBuilder("r", [1, 2], SamplingParams(n=2, max_tokens=64, logprobs=1), tok)
    got = {0: ([], "", []), 1: ([], "", [])}
    num_steps = max(len(a), len(b))
    for k in range(num_steps):
        changed = []
        for index, chunks in enumerate((a, b)):
            if k < len(chunks):
                new, last = chunks[k], k == len(chunks) - 1
                logprobs = [{t: -float(t)} for t in new]
                changed.append((index, new, logprobs, "length" if last else None, "", ""))
        out = builder.update(("r", k == num_steps - 1, 0, changed))
        for c in out.outputs:
            ids, text, lps = got[c.index]
            got[c.index] = (ids + c.new_token_ids, text + c.text_delta, lps + (c.new_logprobs or []))
    assert out.finished
    for c, chunks in zip(out.outputs, (a, b), strict=True):
        want = [t for chunk in chunks for t in chunk]
        ids, text, lps = got[c.index]
        assert c.token_ids == ids == want and c.finish_reason == "length"
        assert c.text == text == tok.decode(want, skip_special_tokens=True)
        assert c.logprobs == lps == [{t: -float(t)} for t in want]


def test_stop_strings_keep_the_engines_text(tiny_ckpt):
    """The engine detokenizes a request with stop strings (it must, to stop it): its text is used."""
    params = SamplingParams(max_tokens=8, stop=["xyz"])
    builder = OutputBuilder("r", [1], params, tokenizer(tiny_ckpt("qwen3")))
    first = builder.update(("r", False, 0, [(0, [40, 41], None, None, "ab", "")]))
    last = builder.update(("r", True, 0, [(0, [42], None, "stop", "c", "abc")]))
    assert first.outputs[0].text_delta == "ab" and last.outputs[0].text_delta == "c"
    assert last.outputs[0].text == "abc" and last.outputs[0].token_ids == [40, 41, 42]


@pytest.mark.parametrize("finished", [False, True])
def test_no_tokenizer_means_no_text(finished):
    builder = OutputBuilder("r", [1], SamplingParams(max_tokens=4), None)
    out = builder.update(("r", finished, 3, [(0, [7], None, "length" if finished else None, "", "")]))
    c = out.outputs[0]
    assert (c.new_token_ids, c.text_delta, out.num_cached_tokens) == ([7], "", 3)
    assert (c.token_ids, c.text) == (([7], "") if finished else (None, ""))
