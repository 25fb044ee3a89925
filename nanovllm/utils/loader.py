"""Load checkpoint tensors into a model whose parameters carry their own ``weight_loader``."""

import glob
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r}")
    for path in files:
        with safe_open(path, "pt", "cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy each named checkpoint tensor into its (possibly packed, possibly sharded) parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    loaded = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        shard_id = None
        for ckpt_key, (our_key, sid) in packed.items():
            if f".{ckpt_key}." in name:
                name, shard_id = name.replace(ckpt_key, our_key), sid
                break
        param = params.get(name)
        if param is None:
            if name == "lm_head.weight":  # some tied checkpoints still store it
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        loader = getattr(param, "weight_loader", None)
        tensor = tensor.to(param.dtype)
        if loader is None:
            param.data.copy_(tensor)
        elif shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(name)
    missing = [n for n in params if n not in loaded and not (n == "lm_head.weight" and _tied(model))]
    if missing:
        raise ValueError(
            f"checkpoint lacks weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )


def _tied(model: nn.Module) -> bool:
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return lm_head is not None and embed is not None and lm_head.weight is embed.weight
