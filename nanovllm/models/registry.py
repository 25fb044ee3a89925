"""Maps ``config.json`` architectures to model classes."""

import importlib
import os

_MODELS = {
    "Qwen3ForCausalLM": ("nanovllm.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen2ForCausalLM": ("nanovllm.models.qwen2", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("nanovllm.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def load_hf_config(model: str):
    """The transformers config of a model directory or a GGUF file."""
    from nanovllm.utils.gguf import is_gguf, load_gguf_config

    if os.path.isfile(model) and is_gguf(model):
        return load_gguf_config(model)
    if not os.path.isdir(model):
        raise ValueError(f"model path {model!r} is neither a directory nor a GGUF file")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"model directory {model!r} has no config.json")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


def resolve_architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in _MODELS:
            return arch
    raise ValueError(
        f"unsupported model architecture {archs or '(none given in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def model_class(hf_config):
    module, name = _MODELS[resolve_architecture(hf_config)]
    return getattr(importlib.import_module(module), name)
