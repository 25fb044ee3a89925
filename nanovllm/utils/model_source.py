"""Where a model comes from: a local directory or GGUF file, the bundled default, or the Hub."""

import os

from nanovllm.utils.gguf import default_model_path, is_gguf


def is_local_gguf(path: str) -> bool:
    return os.path.isfile(path) and is_gguf(path)


def resolve_model(model: str | None) -> str:
    """A local path for ``model``: None means the bundled SmolLM2; a name that is not a local path
    is fetched from the Hugging Face Hub (needs network access)."""
    if model is None:
        return default_model_path()
    if os.path.exists(model):
        return model
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ValueError(f"model {model!r} is not a local path (and not a Hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as e:  # offline, unknown repo, gated repo ...
        raise ValueError(
            f"model {model!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it elsewhere "
            "and pass its directory, or pass a .gguf file"
        ) from None
