"""NANOVLLM_DECODE picks the Triton backend's decode kernel (layers/attention_triton.py): read once,
checked, and turned into the flat kernel's plan shape."""

import pytest
import torch

pytest.importorskip("triton")

from nanovllm.layers import attention_triton  # noqa: E402
from nanovllm.layers.attention_triton import FlatSetting, TritonBackend  # noqa: E402


@pytest.fixture
def setting(monkeypatch):
    def choose(value: str | None):
        if value is None:
            monkeypatch.delenv("NANOVLLM_DECODE", raising=False)
        else:
            monkeypatch.setenv("NANOVLLM_DECODE", value)
        attention_triton.flat_setting.cache_clear()
        return attention_triton.flat_setting()

    yield choose
    monkeypatch.delenv("NANOVLLM_DECODE", raising=False)
    attention_triton.flat_setting.cache_clear()


@pytest.mark.parametrize(
    "value, expect",
    [
        (None, None),
        ("split", None),
        ("flat", FlatSetting(2)),
        ("flat:3", FlatSetting(3)),
        ("flat:4:6", FlatSetting(4, 6)),
        ("flat:1:4:256:8", FlatSetting(1, 4, 256, 8)),
    ],
)
def test_decode_setting(setting, value, expect):
    assert setting(value) == expect


def test_launch_options_name_only_what_is_set(setting):
    assert setting("flat").launch() == {}
    assert setting("flat:1:4:256:8").launch() == {"num_stages": 4, "num_warps": 8}


@pytest.mark.parametrize("value", ["flat:0", "flat:two", "flat:1:2:3:4:5", "stream-k", "flat:"])
def test_bad_decode_setting_names_the_choices(setting, value):
    with pytest.raises(ValueError, match=r"'split' \(the default\) or 'flat\[:PROGRAMS_PER_SM\[:STAGES"):
        setting(value)


def test_block_n_must_be_a_power_of_two(setting):
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two from 16, got 96"):
        setting("flat:2:5:96")


def test_plan_shape_follows_the_cache(setting):
    """Tiles as the split kernel's (128 keys fp8, 64 otherwise), at most one block; no plan for split."""
    cpu = torch.device("cpu")
    setting("split")
    assert TritonBackend.decode_plan_shape(torch.bfloat16, 8, 256, cpu) is None
    setting("flat")
    assert TritonBackend.decode_plan_shape(torch.float8_e4m3fn, 8, 256, cpu)[0] == 128
    assert TritonBackend.decode_plan_shape(torch.bfloat16, 8, 256, cpu)[0] == 64
    assert TritonBackend.decode_plan_shape(torch.float8_e4m3fn, 8, 16, cpu)[0] == 16
    setting("flat:2:4:256")
    assert TritonBackend.decode_plan_shape(torch.bfloat16, 8, 256, cpu)[0] == 256
