"""nanovllm: a small, readable LLM inference engine in the shape of vLLM.

Importing the package is cheap: ``LLM`` (which pulls in torch) is loaded on first use, so the
scheduler, block manager and sequence can be imported and tested without torch.
"""

from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from nanovllm.llm import LLM

        return LLM
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
