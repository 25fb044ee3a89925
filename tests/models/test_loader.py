"""Checkpoint loading refuses incomplete, extra, misshapen, duplicated and corrupt weights with an error
that names the tensor and the file, on the tiny random checkpoints (safetensors) and a tiny GGUF."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.models.registry import model_class
from nanovllm.utils.loader import iter_safetensors, load_weights

ENGINE = dict(kvcache_block_size=16, max_model_len=128)
GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = [5, 17, 42, 99, 7, 3, 250]


@pytest.fixture
def copy_ckpt(tiny_ckpt, tmp_path):
    """copy_ckpt(arch) -> (directory, path of its model.safetensors): a private copy to break."""

    def copy(arch: str = "qwen3") -> tuple[str, str]:
        path = str(tmp_path / arch)
        shutil.copytree(tiny_ckpt(arch), path)
        return path, os.path.join(path, "model.safetensors")

    return copy


def edit(file: str, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def load_error(path: str, **engine) -> str:
    with pytest.raises(ValueError) as info:
        LLM(path, **{**ENGINE, **engine})
    return str(info.value)


def greedy(path: str) -> list[int]:
    with LLM(path, **ENGINE) as llm:
        return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]["token_ids"]


@pytest.mark.parametrize(
    "arch, name",
    [
        ("qwen3", "model.layers.0.self_attn.k_proj.weight"),  # one shard of the fused qkv_proj
        ("qwen3", "model.layers.1.mlp.up_proj.weight"),  # one shard of the fused gate_up_proj
        ("qwen3", "model.embed_tokens.weight"),  # tied: also the lm_head
        ("qwen3", "model.layers.1.self_attn.k_norm.weight"),  # a plain parameter
        ("qwen2", "model.layers.0.self_attn.v_proj.bias"),  # a shard of the fused bias
        ("qwen2", "lm_head.weight"),  # untied
    ],
)
def test_missing_tensor_names_tensor_and_file(copy_ckpt, arch, name):
    path, file = copy_ckpt(arch)
    edit(file, lambda t: t.pop(name))
    message = load_error(path)
    assert "lacks 1 tensor" in message and repr(name) in message and file in message


def test_every_missing_tensor_is_counted(copy_ckpt):
    path, file = copy_ckpt("llama")
    edit(file, lambda t: [t.pop(n) for n in list(t) if ".layers.1." in n])
    message = load_error(path)
    assert "lacks 9 tensor(s)" in message and "and 1 more" in message  # 8 are listed
    assert "'model.layers.1.mlp.gate_proj.weight'" in message


@pytest.mark.slow
def test_missing_tensor_under_tensor_parallelism_is_named_by_every_rank(copy_ckpt):
    """Each rank loads its own shards, so each finds the gap; the engine refuses to start, no hang."""
    import multiprocessing as mp

    import torch.distributed as dist

    path, file = copy_ckpt()
    edit(file, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(
        Exception, match=r"lacks 1 tensor\(s\) .*'model.layers.0.self_attn.k_proj.weight'"
    ) as info:
        LLM(path, tensor_parallel_size=2, **ENGINE)
    assert file in str(info.value)
    assert not mp.active_children() and not dist.is_initialized()


def test_unknown_tensor_names_tensor_and_file(copy_ckpt):
    path, file = copy_ckpt()
    edit(file, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}))
    message = load_error(path)
    assert "'model.layers.0.mlp.extra_proj.weight'" in message and file in message
    assert "no matching model parameter" in message


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.0.self_attn.k_proj.weight", (31, 64)),  # 2 KV heads x 16 = 32 rows
        ("model.layers.0.self_attn.q_proj.weight", (64, 63)),
        ("model.layers.1.mlp.gate_proj.weight", (129, 64)),
        ("model.layers.1.mlp.down_proj.weight", (64, 64)),
        ("model.layers.0.self_attn.o_proj.weight", (64, 32)),
        ("model.norm.weight", (1,)),  # would broadcast silently through copy_
        ("model.layers.0.self_attn.q_norm.weight", (16, 1)),
    ],
)
def test_wrong_shape_names_tensor_file_and_both_shapes(copy_ckpt, name, shape):
    path, file = copy_ckpt()
    edit(file, lambda t: t.update({name: torch.zeros(shape)}))
    message = load_error(path)
    assert repr(name) in message and file in message
    assert f"has shape {shape}" in message and "but the model expects" in message


@pytest.mark.parametrize("vocab_size", [383, 400])
def test_config_vocab_size_must_match_the_embedding(copy_ckpt, vocab_size):
    path, file = copy_ckpt("qwen3")  # tied: the embedding is the only vocab-sized tensor
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "vocab_size": vocab_size}, f)
    message = load_error(path)
    assert "'model.embed_tokens.weight'" in message and file in message
    assert f"vocab_size={vocab_size}" in message and "(384, 64)" in message


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_named(copy_ckpt, keep):
    path, file = copy_ckpt()
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(int(size * keep))
    message = load_error(path)
    assert file in message and "truncated or corrupt" in message


def test_corrupt_header_is_named(copy_ckpt):
    path, file = copy_ckpt()
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    assert file in load_error(path)


def split_in_two(path: str, file: str, duplicate: str | None = None, drop: str | None = None) -> list[str]:
    """Rewrite a one-file checkpoint as two shards and an index, as sharded HF checkpoints are."""
    tensors = load_file(file)
    os.remove(file)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    if duplicate is not None:  # present in both files
        for shard_names in shards.values():
            if duplicate not in shard_names:
                shard_names.append(duplicate)
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file(
            {n: tensors[n] for n in shard_names if n != drop}, os.path.join(path, shard), {"format": "pt"}
        )
        weight_map |= {n: shard for n in shard_names}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return [os.path.join(path, s) for s in shards]


def test_sharded_checkpoint_loads_with_the_same_output(copy_ckpt):
    path, file = copy_ckpt()
    expected = greedy(path)
    split_in_two(path, file)
    assert greedy(path) == expected


def test_tensor_in_two_shards_names_both_files(copy_ckpt):
    path, file = copy_ckpt()
    first, second = split_in_two(path, file, duplicate="model.layers.0.mlp.up_proj.weight")
    message = load_error(path)
    assert message.count("model.layers.0.mlp.up_proj.weight") == 2 and first in message and second in message
    assert "once" in message


def test_missing_tensor_of_a_sharded_checkpoint_names_the_index_file(copy_ckpt):
    path, file = copy_ckpt()
    name = "model.layers.1.self_attn.v_proj.weight"
    position = sorted(load_file(file)).index(name)
    first, second = split_in_two(path, file, drop=name)
    message = load_error(path)
    assert repr(name) in message and f"expected in {second if position % 2 else first}" in message


def test_tied_checkpoint_that_also_stores_lm_head_still_loads(copy_ckpt):
    path, file = copy_ckpt("qwen3")
    expected = greedy(path)
    edit(file, lambda t: t.update({"lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"])}))
    assert greedy(path) == expected  # HF ignores a tied model's stored lm_head, and so do we


def test_plain_name_tensor_pairs_still_load(tiny_ckpt):
    """load_weights also takes (name, tensor) pairs; the error then says where they came from."""
    from transformers import AutoConfig

    path = tiny_ckpt("qwen3")
    config = AutoConfig.from_pretrained(path)
    tensors = dict(iter_safetensors(path))
    model = model_class(config)(config)
    load_weights(model, tensors.items())
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])
    tensors.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"'model.norm.weight' \(expected in the given weights\)"):
        load_weights(model_class(config)(config), tensors.items())


# ---------------------------------------------------------------------------------------------------------
# GGUF: the same checks through the same loader, on a float32 GGUF written from the tiny Qwen3 checkpoint
# (llama.cpp stores Qwen3's Q/K rows in HF order, so the tensors go in unchanged).


def write_gguf(ckpt: str, out: str, change=None) -> str:
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e .[gguf])")
    from nanovllm.utils.gguf import gguf_to_hf_name, hf_to_gguf_name

    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    writer = gguf.GGUFWriter(out, "qwen3")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tensors = {}
    for name, tensor in load_file(os.path.join(ckpt, "model.safetensors")).items():
        assert gguf_to_hf_name(hf_to_gguf_name(name)) == name
        tensors[hf_to_gguf_name(name)] = tensor.numpy()
    if change is not None:
        change(tensors)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def load_gguf(path: str) -> torch.nn.Module:
    from nanovllm.utils.gguf import iter_gguf_weights, load_gguf_config

    config = load_gguf_config(path)
    model = model_class(config)(config)
    load_weights(model, iter_gguf_weights(path))
    return model


def test_gguf_loads_the_same_parameters_as_safetensors(tiny_ckpt, tmp_path):
    from transformers import AutoConfig

    ckpt = tiny_ckpt("qwen3")
    config = AutoConfig.from_pretrained(ckpt)
    reference = model_class(config)(config)
    load_weights(reference, iter_safetensors(ckpt))
    ours = dict(load_gguf(write_gguf(ckpt, str(tmp_path / "tiny.gguf"))).named_parameters())
    for name, param in reference.named_parameters():
        assert torch.equal(ours[name], param), name


@pytest.mark.parametrize(
    "change, named",
    [
        (
            lambda t: t.pop("blk.0.attn_k.weight"),
            "'blk.0.attn_k.weight' (model.layers.0.self_attn.k_proj.weight)",
        ),
        (lambda t: t.pop("blk.1.ffn_up.weight"), "'blk.1.ffn_up.weight' (model.layers.1.mlp.up_proj.weight)"),
        (lambda t: t.pop("output_norm.weight"), "'output_norm.weight' (model.norm.weight)"),
        (lambda t: t.update({"blk.0.attn_v.weight": t["blk.0.attn_v.weight"][:16]}), "has shape (16, 64)"),
    ],
)
def test_gguf_missing_or_misshapen_tensor_names_tensor_and_file(tiny_ckpt, tmp_path, change, named):
    path = write_gguf(tiny_ckpt("qwen3"), str(tmp_path / "broken.gguf"), change)
    with pytest.raises(ValueError) as info:
        load_gguf(path)
    assert named in str(info.value) and path in str(info.value)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_gguf_is_named(tiny_ckpt, tmp_path, cut):
    path = write_gguf(tiny_ckpt("qwen3"), str(tmp_path / "cut.gguf"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000 if cut == "data" else 100)
    with pytest.raises(ValueError, match="truncated") as info:
        load_gguf(path)
    assert path in str(info.value)
