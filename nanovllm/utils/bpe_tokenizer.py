"""A byte-level BPE tokenizer (GPT-2's family: SmolLM2, Llama 3, Qwen2) built from a GGUF header with the
``tokenizers`` library, and the part of transformers' tokenizer interface that nanovllm uses.

transformers' own GGUF conversion costs about a second of a 2-core CPU's start-up (its import alone is
~0.8 s) for what is a vocabulary, a merge list and a split rule; this builds the same ``tokenizers``
pipeline in ~0.1 s. The split rule comes from ``tokenizer.ggml.pre``, as llama.cpp reads it; where
transformers ignores that key (``smollm``: digits split one by one, as SmolLM2's own tokenizer does) we
follow the file, and tests/models/test_gguf_tokenizer.py checks us against llama.cpp there and against
transformers everywhere else. Any other vocabulary is converted by transformers (gguf_tokenizer.py).
"""

import re
from typing import Any

from nanovllm.utils.chat_template import render_chat_template

# The split regexes of llama.cpp's pre-tokenizer types (the model's own tokenizer.json has the same).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE: "gpt2" (GPT-2's regex), "digits" (each digit
# alone, then GPT-2's regex) or a regex (then bytes mapped without GPT-2's regex).
PRE_TOKENIZERS: dict[str, str] = {
    "gpt2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68
    (controls, space, 0x7f-0xa0, 0xad) for U+0100 onwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelled = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in spelled):
        spelled[b] = chr(0x100 + n)
    return spelled


def _respell(tokens: list[str]) -> list[str]:
    """Tokens as the byte alphabet spells them: a token stored with other characters (a plain space, a
    raw newline) is respelled from its UTF-8 bytes, as transformers does. Usually none is."""
    alphabet = byte_alphabet()
    outside = re.compile("[^" + re.escape("".join(alphabet.values())) + "\x00]")
    if not outside.search("\x00".join(tokens)):
        return tokens
    return [t if not outside.search(t) else "".join(alphabet[b] for b in t.encode()) for t in tokens]


class ByteLevelBPETokenizer:
    """encode / decode / convert_ids_to_tokens / apply_chat_template with transformers' signatures and
    results; the special tokens as ``bos_token`` ... and ``bos_token_id`` ...; ``chat_template``."""

    @staticmethod
    def supports(metadata: dict[str, Any]) -> bool:
        """A GPT-2-style vocabulary whose split rule (``tokenizer.ggml.pre``, GPT-2's when absent) we know."""
        pre = metadata.get("tokenizer.ggml.pre", "gpt2")
        return metadata.get("tokenizer.ggml.model") == "gpt2" and pre in PRE_TOKENIZERS

    def __init__(self, metadata: dict[str, Any]):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        if not self.supports(metadata):
            raise ValueError(
                f"GGUF tokenizer model={metadata.get('tokenizer.ggml.model')!r} "
                f"pre={metadata.get('tokenizer.ggml.pre')!r} is not a byte-level BPE this class builds; "
                "load it with nanovllm.utils.gguf_tokenizer.load_gguf_tokenizer (transformers converts it)"
            )
        pre = metadata.get("tokenizer.ggml.pre", "gpt2")
        raw = metadata["tokenizer.ggml.tokens"]
        tokens = _respell(raw)
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(raw)
        if len(types) != len(raw):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(raw)} tokens")
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        bpe = models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            ignore_merges=PRE_TOKENIZERS[pre] == _LLAMA3_SPLIT,  # llama.cpp (and Llama 3's tokenizer.json)
        )
        self._tok = tok = Tokenizer(bpe)
        split = PRE_TOKENIZERS[pre]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "digits"))
        if split == "gpt2":
            tok.pre_tokenizer = byte_level
        elif split == "digits":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(True), byte_level])
        else:
            from tokenizers import Regex

            splitter = pre_tokenizers.Split(Regex(split), behavior="isolated")
            tok.pre_tokenizer = pre_tokenizers.Sequence([splitter, byte_level])
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) match whole in text and are special (decode can skip them);
        # user-defined ones (<think>) match whole and are not. A "control" token spelled outside the
        # byte alphabet is a mislabel that transformers skips too.
        specials = [t for t, r, k in zip(tokens, raw, types, strict=True) if k == CONTROL and t == r]
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        users = [t for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED]
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in users])
        self._special_ids = {tok.token_to_id(t) for t in specials}

        def name(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        self.bos_token, self.eos_token = name("bos_token_id"), name("eos_token_id")
        self.unk_token, self.pad_token = name("unknown_token_id"), name("padding_token_id")
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        single, ends = ["$A:0"], {}  # what encode(add_special_tokens=True) wraps a text in
        if metadata.get("tokenizer.ggml.add_bos_token") and self.bos_token is not None:
            single.insert(0, f"{self.bos_token}:0")
            ends[self.bos_token] = self.bos_token_id
        if metadata.get("tokenizer.ggml.add_eos_token") and self.eos_token is not None:
            single.append(f"{self.eos_token}:0")
            ends[self.eos_token] = self.eos_token_id
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(ends.items()))

    # ---- the special tokens -------------------------------------------------------------------

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(
        self, ids: int | list[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        skip = self._special_ids if skip_special_tokens else ()
        return [self._tok.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """One conversation through ``chat_template``; its token ids (no BOS/EOS added), or with
        ``tokenize=False`` the text. Extra keywords are template variables, as in transformers."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer.chat_template is not set)")
        if continue_final_message:
            raise ValueError("continue_final_message is not supported for GGUF tokenizers; drop it")
        text = render_chat_template(
            self.chat_template,
            conversation,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text
