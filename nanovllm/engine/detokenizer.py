"""Incremental detokenization: the text each new token adds, correct across multi-byte characters.

Decoding token by token is wrong for byte-level tokenizers: one UTF-8 character can span several
tokens (each alone decodes to U+FFFD), and some tokenizers change earlier spacing once they see
later tokens. So we decode a small window (from ``prefix_offset``) twice, without and with the new
tokens, and emit the difference, holding back while the text ends in an incomplete character.
"""

REPLACEMENT_CHAR = "\ufffd"
_WINDOW = 6  # tokens of left context kept when re-decoding


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_ids: list[int]) -> str:
        """Given all generated token ids so far, return (and append) the text that is now final."""
        prefix = self._decode(token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete
        delta = full[len(prefix) :]
        self.text += delta
        self.read_offset = len(token_ids)
        self.prefix_offset = max(0, self.read_offset - _WINDOW)
        return delta

    def flush(self, token_ids: list[int]) -> str:
        """At the end: whatever is left (an incomplete character decodes as U+FFFD)."""
        full = self._decode(token_ids[self.prefix_offset :])
        prefix = self._decode(token_ids[self.prefix_offset : self.read_offset])
        delta = full[len(prefix) :]
        self.text += delta
        self.read_offset = len(token_ids)
        return delta
