"""Per-step attention metadata, set once per forward by the model runner and read by the layers."""

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Context:
    is_prefill: bool = False
    # Prefill: new tokens of all sequences packed back to back.
    cu_seqlens_q: torch.Tensor | None = None  # [num_seqs + 1] int32, offsets into the new tokens
    max_seqlen_q: int = 0
    # Both: keys per sequence (cached prefix + new tokens) and where each sequence's K/V live.
    context_lens: torch.Tensor | None = None  # [num_seqs] int32
    max_context_len: int = 0  # an upper bound of context_lens (fixed under CUDA graphs)
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor | None = None  # [num_new_tokens] int32/int64, cache slot of each new token


_CONTEXT = Context()
_ACTIVE = False


def get_context() -> Context:
    return _CONTEXT


@contextmanager
def forward_context(context: Context):
    """Make ``context`` current for one forward pass. Nesting is a bug, so it is refused."""
    global _CONTEXT, _ACTIVE
    if _ACTIVE:
        raise RuntimeError("forward_context is already active; nested forwards are not supported")
    _CONTEXT, _ACTIVE = context, True
    try:
        yield context
    finally:
        _CONTEXT, _ACTIVE = Context(), False


_ACTIVE = False
