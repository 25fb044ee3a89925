import math
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanovllm.sampling_params import MAX_LOGPROBS, SamplingParams

FLOAT_FIELDS = [
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "min_p",
]

# vLLM's accepted ranges (vllm/sampling_params.py, SamplingParams._verify_args), written out
# independently of our code: the float fields and their predicates.
VLLM_FLOAT_RANGES = {
    "presence_penalty": lambda x: -2.0 <= x <= 2.0,
    "frequency_penalty": lambda x: -2.0 <= x <= 2.0,
    "repetition_penalty": lambda x: x > 0.0,
    "temperature": lambda x: x >= 0.0,
    "top_p": lambda x: 0.0 < x <= 1.0,
    "min_p": lambda x: 0.0 <= x <= 1.0,
}
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)


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
    SamplingParams(top_p=1e-6, top_k=1, min_p=1.0, logprobs=MAX_LOGPROBS)
    SamplingParams(min_tokens=10, max_tokens=10, logprobs=0)
    SamplingParams(temperature=FLOAT32_MAX, repetition_penalty=FLOAT32_TINY)
    SamplingParams(top_k=2**63 - 1, max_tokens=2**63 - 1)
    for seed in (-(2**63), 0, 2**63, 2**64 - 1):  # signed or unsigned 64-bit
        assert SamplingParams(seed=seed).seed == seed
    assert SamplingParams(n=3, seed=2**64 - 3).seed == 2**64 - 3  # children use seed, seed+1, seed+2


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("n", 2.0),
        ("n", None),
        ("n", True),
        ("presence_penalty", -2.1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -2.1),
        ("frequency_penalty", 2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 1e-50),  # 0 in float32, the sampler's dtype
        ("temperature", -0.1),
        ("temperature", "0.7"),
        ("temperature", None),
        ("temperature", True),
        ("temperature", 1e39),  # inf in float32
        ("temperature", 10**400),  # too big for a float at all
        ("temperature", 1j),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_p", 1e-50),
        ("top_p", "1"),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", 2**63),  # would overflow the int64 top-k tensor
        ("top_k", "5"),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", 1.5),
        ("seed", "7"),
        ("seed", True),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", -(2**70)),
        ("stop", [""]),
        ("stop", [3]),
        ("stop", 5),
        ("stop", {"a"}),
        ("stop", b"x"),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", "12"),
        ("max_tokens", 0),
        ("max_tokens", 16.0),
        ("max_tokens", None),
        ("max_tokens", "16"),
        ("min_tokens", -1),
        ("min_tokens", 65),  # above max_tokens=64
        ("min_tokens", 1.0),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", True),
        ("logprobs", 2.0),
        ("ignore_eos", 1),
        ("ignore_eos", None),
        ("include_stop_str_in_output", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})


def test_seed_and_n_must_leave_room_for_every_child():
    with pytest.raises(ValueError, match="seed") as info:
        SamplingParams(n=3, seed=2**64 - 2)
    assert "n=3" in str(info.value)


def test_wrong_type_message_names_the_type():
    with pytest.raises(ValueError, match="temperature must be a number, got str '0.7'"):
        SamplingParams(temperature="0.7")
    with pytest.raises(ValueError, match="max_tokens must be an integer, got float 16.0"):
        SamplingParams(max_tokens=16.0)


@given(
    field=st.sampled_from(FLOAT_FIELDS),
    value=st.floats(allow_nan=True, allow_infinity=True) | st.floats(-3, 3) | st.integers(-3, 3),
)
def test_float_ranges_agree_with_vllm(field, value):
    """Accepted iff vLLM accepts it and it is finite in float32; exclusive zero bounds also in float32."""
    in_vllm_range = VLLM_FLOAT_RANGES[field](value)
    finite = math.isfinite(value) and abs(value) <= FLOAT32_MAX
    if field in ("top_p", "repetition_penalty"):  # tiny positives that float32 rounds to 0
        finite = finite and float(np.float32(value)) > 0
    try:
        params = SamplingParams(**{field: value})
    except ValueError as e:
        assert field in str(e)
        assert not (in_vllm_range and finite)
    else:
        assert in_vllm_range and finite
        assert getattr(params, field) == value and type(getattr(params, field)) is float


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("min_tokens", 100),
        ("stop", [""]),
        ("seed", 2**64),
    ],
)
def test_validate_catches_fields_changed_after_construction(field, value):
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_validate_is_idempotent_and_normalises_late_changes():
    params = SamplingParams(top_k=-1, stop="x", stop_token_ids=(3,), seed=5, n=2)
    before = asdict(params)
    params.validate()
    assert asdict(params) == before
    params.top_k, params.stop = -1, "y"
    params.validate()
    assert (params.top_k, params.stop) == (0, ["y"])
    # The engine fans out n > 1 with dataclasses.replace, which validates each child.
    assert replace(params, n=1, seed=params.seed + 1).seed == 6


def test_numpy_scalars_become_python_numbers():
    params = SamplingParams(
        n=np.int64(2),
        temperature=np.float32(0.5),
        top_p=np.float64(0.9),
        top_k=np.int32(5),
        seed=np.uint64(2**64 - 2),
        max_tokens=np.int16(8),
        stop_token_ids=np.array([4, 5]).tolist(),
    )
    assert (params.n, params.top_k, params.seed, params.max_tokens) == (2, 5, 2**64 - 2, 8)
    assert type(params.n) is int and type(params.seed) is int and type(params.top_k) is int
    assert (params.temperature, params.top_p) == (0.5, 0.9) and type(params.temperature) is float
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=np.float64("nan"))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=np.bool_(True))


def test_unknown_argument_is_an_error():
    with pytest.raises(TypeError):
        SamplingParams(best_of=2)


def test_no_torch_import():
    code = "import sys, nanovllm.sampling_params, nanovllm.engine.sequence; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("field, value", [("n", 0), ("temperature", math.inf), ("max_tokens", 2.5)])
def test_engine_revalidates_params_changed_after_construction(tiny_ckpt, field, value):
    """``sp.n = 0`` used to queue a request with no sequences, and generate never returned. (Called
    through ``add_request`` so that a regression fails here instead of hanging the suite.)"""
    from nanovllm import LLM

    params = SamplingParams(temperature=0, max_tokens=4)
    setattr(params, field, value)
    with LLM(tiny_ckpt("qwen3"), kvcache_block_size=16, max_model_len=128) as llm:
        with pytest.raises(ValueError, match=field):
            llm.engine.add_request([5, 6, 7], params)
        assert not llm.engine.requests
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert len(out[0]["token_ids"]) == 4
