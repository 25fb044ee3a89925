import subprocess
import sys

import pytest

from nanovllm.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.logprobs) == (None, [], [], None)
    assert (p.max_tokens, p.min_tokens) == (64, 0)
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy


def test_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 7)).stop_token_ids == [5, 7]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy  # below vLLM's sampling epsilon


def test_edges_of_ranges_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3)
    SamplingParams(top_p=1e-6, top_k=1, min_p=1.0, seed=-(2**70), logprobs=MAX_LOGPROBS)
    SamplingParams(min_tokens=10, max_tokens=10, logprobs=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("presence_penalty", -2.1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -2.1),
        ("frequency_penalty", 2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", 1.5),
        ("seed", "7"),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 65),  # above max_tokens=64
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("ignore_eos", 1),
        ("include_stop_str_in_output", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_out_of_range_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_argument_is_an_error():
    with pytest.raises(TypeError):
        SamplingParams(best_of=2)


def test_no_torch_import():
    code = "import sys, nanovllm.sampling_params, nanovllm.engine.sequence; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
