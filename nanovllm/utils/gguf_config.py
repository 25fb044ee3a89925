"""The model config of a GGUF file, without transformers.

transformers builds a ``LlamaConfig`` only after importing its model registry (about a second of a 2-core
CPU's start-up, most of what ``nanovllm generate`` spent before its first token besides torch). The models
read a few plain fields, so a GGUF file gets this small object instead: the same field names and values
as transformers' config of the same model (tests/models/test_gguf.py compares them).
"""

from typing import Any


class GGUFModelConfig:
    """Attribute access like a transformers ``PretrainedConfig``: ``model_type``, ``architectures``,
    ``hidden_size``, ... and ``rope_parameters`` (transformers 5's form) beside ``rope_theta`` and
    ``rope_scaling`` (transformers 4's)."""

    def __init__(self, model_type: str, **fields: Any):
        self.model_type = model_type
        self.hidden_act = "silu"
        self.attention_bias = False
        self.attention_dropout = 0.0
        self.mlp_bias = False
        self.__dict__.update(fields)
        scaling = fields.get("rope_scaling") or {"rope_type": "default"}
        self.rope_parameters = {"rope_theta": fields["rope_theta"], **scaling}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"GGUFModelConfig({self.__dict__})"
