"""Load checkpoint tensors into a model whose parameters carry their own ``weight_loader``.

The loader writes every *slot* exactly once. A plain parameter is one slot; a packed parameter has
one slot per checkpoint tensor fused into it (``qkv_proj``: q, k, v; ``gate_up_proj``: 0, 1, from the
model's ``packed_modules_mapping``). Parameters start as uninitialised memory, so a slot left
unwritten would run on garbage: a missing, duplicated, unexpected or wrongly shaped checkpoint
tensor is a ``ValueError`` that names the tensor and the file it came from (or should have come from).
A tied ``lm_head.weight`` is the embedding's slot; a checkpoint copy of it is skipped, as HF does.
"""

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from torch import nn

# A slot: (parameter name, shard id or None for an unpacked parameter).
Slot = tuple[str, object]


def expect_shape(loaded: torch.Tensor, shape: Sequence[int], hint: str = "") -> None:
    """Raise ``ValueError`` unless ``loaded`` (a whole checkpoint tensor) has ``shape``."""
    if tuple(loaded.shape) != tuple(shape):
        raise ValueError(f"has shape {tuple(loaded.shape)}, but the model expects {tuple(shape)}{hint}")


@dataclass
class CheckpointTensors:
    """A checkpoint's tensors under HF names, read one at a time, and where each lives on disk.

    Iterating gives ``(name, tensor)`` pairs; ``read()`` also gives each tensor's file.
    """

    read: Callable[[], Iterator[tuple[str, str, torch.Tensor]]]  # yields (file, name, tensor)
    expected_file: Callable[[str], str]  # the file a tensor of this name belongs in
    stored_name: Callable[[str], str] = lambda name: name  # the name as the file spells it
    # name -> ggml type of a float parameter's tensor that comes as raw block bytes (see _keep_blocks)
    blocks: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for _, name, tensor in self.read():
            yield name, tensor

    def describe(self, name: str) -> str:
        stored = self.stored_name(name)
        return repr(name) if stored == name else f"{stored!r} ({name})"


def iter_safetensors(model_dir: str) -> CheckpointTensors:
    """The tensors of every ``*.safetensors`` file in ``model_dir`` (sorted by file name)."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r}")
    weight_map = _safetensors_index(model_dir)

    def read() -> Iterator[tuple[str, str, torch.Tensor]]:
        for path in files:
            try:
                with safe_open(path, "pt", "cpu") as f:
                    for name in f.keys():
                        yield path, name, f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types, with no file name
                raise ValueError(
                    f"{path} is not a readable safetensors file (truncated or corrupt?): "
                    f"{type(e).__name__}: {e}; download or save it again"
                ) from e

    def expected_file(name: str) -> str:
        if name in weight_map:
            return os.path.join(model_dir, weight_map[name])
        return files[0] if len(files) == 1 else f"one of the {len(files)} *.safetensors files in {model_dir}"

    return CheckpointTensors(read, expected_file)


def _safetensors_index(model_dir: str) -> dict[str, str]:
    """tensor name -> file name, from ``model.safetensors.index.json`` when a sharded checkpoint has one."""
    path = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return dict(json.load(f)["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid safetensors index ({e}); download it again") from e


def load_weights(model: nn.Module, weights: CheckpointTensors | Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each named checkpoint tensor into its (possibly packed, possibly sharded) parameter.

    A model on the CPU is loaded with one torch thread: its copies are small (a few hundred KB) and a
    second thread only adds a barrier to each, which on a busy 2-core machine waits for a time slice
    (measured: 8 ms instead of 0.5 ms per 550 KB copy under load 3, 1.5 s of a 3 s load)."""
    param = next(model.parameters(), None)
    threads = torch.get_num_threads()
    single = param is not None and param.device.type == "cpu" and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        _load_weights(model, weights)
    finally:
        if single:
            torch.set_num_threads(threads)


def _load_weights(model: nn.Module, weights: CheckpointTensors | Iterable[tuple[str, torch.Tensor]]) -> None:
    if not isinstance(weights, CheckpointTensors):
        pairs = weights
        weights = CheckpointTensors(
            lambda: (("the given weights", name, tensor) for name, tensor in pairs),
            lambda name: "the given weights",
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    canonical = _canonical_names(model)
    packed = getattr(model, "packed_modules_mapping", {})
    expected = _expected_slots(canonical, packed)  # slot -> checkpoint tensor name
    written: dict[Slot, tuple[str, str]] = {}  # slot -> (file, checkpoint tensor name)
    for file, ckpt_name, tensor in weights.read():
        if "rotary_emb.inv_freq" in ckpt_name:
            continue
        name, shard_id = _param_name(ckpt_name, packed)
        where = f"checkpoint tensor {weights.describe(ckpt_name)} in {file}"
        if name not in params:
            raise ValueError(
                f"{where} has no matching model parameter; the checkpoint does not fit this "
                f"architecture ({type(model).__name__}) or this config"
            )
        if canonical[name] != name:  # a tied alias (lm_head.weight of a tied model)
            continue
        slot = (name, shard_id)
        if slot in written:
            first_file, first_name = written[slot]
            raise ValueError(
                f"{where} writes the same weights as {weights.describe(first_name)} in {first_file}; "
                "a checkpoint must hold each tensor once"
            )
        param = params[name]
        try:
            if ckpt_name in weights.blocks:
                _keep_blocks(model, name, param, tensor, weights.blocks[ckpt_name])
            else:
                _load_one(param, tensor, shard_id)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{where} {e}") from e
        written[slot] = file, ckpt_name
    missing = [ckpt_name for slot, ckpt_name in expected.items() if slot not in written]
    if missing:
        listed = "; ".join(
            f"{weights.describe(n)} (expected in {weights.expected_file(n)})" for n in missing[:8]
        )
        more = f"; and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs: {listed}{more}; "
            "the files are incomplete or were written for another config"
        )


def _load_one(param: nn.Parameter, tensor: torch.Tensor, shard_id: object) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        expect_shape(tensor, param.shape)
        param.data.copy_(tensor)
    elif shard_id is None:
        loader(param, tensor.to(param.dtype))
    else:
        loader(param, tensor.to(param.dtype), shard_id)


def _keep_blocks(model: nn.Module, name: str, param: nn.Parameter, blocks: torch.Tensor, qtype: str) -> None:
    """The embedding ``name`` stays in its GGUF blocks (uint8 ``[vocab, row_bytes]``): the module that
    holds it gets ``lean_embed``, a ``PackedWeight`` the lean CPU forward looks rows up in and (tied)
    computes logits with, and the float parameter is emptied. Nothing is dequantised here; a forward
    that needs the float matrix rebuilds it from the blocks (``models/llama_cpu.py``, ``dense_embedding``)."""
    from nanovllm.layers.quantization import PackedWeight, row_bytes

    owner_name = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""  # model.embed_tokens.weight -> model
    expect_shape(blocks, (param.shape[0], row_bytes(qtype, param.shape[1])), f" ({qtype} blocks)")
    model.get_submodule(owner_name).lean_embed = PackedWeight(blocks, qtype)
    param.data = torch.empty(0, dtype=param.dtype)


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name -> the first name of the same tensor (tied weights share one slot)."""
    first: dict[int, str] = {}
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(param), name)
    return names


def _param_name(ckpt_name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard id): q_proj -> (qkv_proj, "q")."""
    for ckpt_key, (our_key, shard_id) in packed.items():
        if f".{ckpt_key}." in ckpt_name:
            return ckpt_name.replace(f".{ckpt_key}.", f".{our_key}."), shard_id
    return ckpt_name, None


def _expected_slots(canonical: dict[str, str], packed: dict[str, tuple[str, object]]) -> dict[Slot, str]:
    """Every slot the checkpoint must write -> the checkpoint tensor name that writes it."""
    slots: dict[Slot, str] = {}
    for name in canonical:
        if canonical[name] != name:
            continue
        shards = [(k, sid) for k, (ours, sid) in packed.items() if f".{ours}." in name]
        for ckpt_key, shard_id in shards:
            our_key = packed[ckpt_key][0]
            slots[(name, shard_id)] = name.replace(f".{our_key}.", f".{ckpt_key}.")
        if not shards:
            slots[(name, None)] = name
    return slots
