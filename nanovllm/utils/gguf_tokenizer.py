"""The tokenizer of a GGUF file: byte-level BPE vocabularies built directly (bpe_tokenizer.py, ~0.1 s);
any other (sentencepiece, unigram, an unknown split rule) converted by transformers once and then read
from a cache."""

import os


def tokenizer_cache_dir() -> str:
    """Where converted GGUF tokenizers are kept: $NANOVLLM_CACHE_DIR, else the user's cache directory."""
    root = os.environ.get("NANOVLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanovllm"
    )
    return os.path.join(root, "gguf-tokenizers")


def load_gguf_tokenizer(path: str):
    """The tokenizer ``tokenizer.ggml.*`` describes, with the file's chat template: a
    ``ByteLevelBPETokenizer`` where it supports the vocabulary, else transformers' conversion."""
    from nanovllm.utils.bpe_tokenizer import ByteLevelBPETokenizer
    from nanovllm.utils.gguf import GGUFFile

    meta = GGUFFile(path).metadata
    if ByteLevelBPETokenizer.supports(meta):
        return ByteLevelBPETokenizer(meta)
    return convert_gguf_tokenizer(path)


def convert_gguf_tokenizer(path: str):
    """A transformers (fast) tokenizer rebuilt from ``tokenizer.ggml.*``, with the file's chat template.

    transformers' GGUF conversion takes seconds (it parses the whole header in Python), so the result is
    saved once under ``tokenizer_cache_dir()``, keyed by a hash of the file's header (which holds the
    vocabulary, merges and template) and the transformers version; a changed file gets a new key. Two
    processes converting at once each write a private directory and rename it into place; the loser
    throws its copy away. An unreadable cache entry is converted again.
    """
    import hashlib
    import shutil
    import tempfile

    import transformers
    from transformers import AutoTokenizer

    from nanovllm.utils.gguf import GGUFFile

    path = os.path.abspath(path)
    f = GGUFFile(path)
    digest = hashlib.sha256(f._map[: f.header_size].tobytes())
    digest.update(transformers.__version__.encode())
    cached = os.path.join(tokenizer_cache_dir(), digest.hexdigest()[:32])
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception:  # a damaged entry: convert again below
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if tokenizer.chat_template is None:  # recent transformers copy it over themselves
        tokenizer.chat_template = f.metadata.get("tokenizer.chat_template")
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cached), prefix=".tmp-")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:  # a read-only cache directory costs only the time
        pass
    return tokenizer
