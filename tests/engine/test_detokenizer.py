"""Incremental detokenization stays equal to a full decode, also when characters span tokens."""

import pytest

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from tests.tiny import build_tokenizer

TEXTS = ["Über naïve café — 日本語のテキスト and emoji 🙂🙂.", "plain ascii words here", "🙂" * 5 + " 寿司"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.step(ids[: i + 1]) for i in range(len(ids))]
    deltas.append(detok.flush(ids))
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_held_until_complete(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # the byte-level tokenizer splits the emoji (the case under test)
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.step(ids[: i + 1]) for i in range(len(ids) - 1)] == [""] * (len(ids) - 1)
    assert detok.step(ids) == "🙂"
