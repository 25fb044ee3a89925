"""Per-step attention metadata, set once per forward by the model runner and read by the layers.

A step packs the new tokens of every scheduled sequence back to back; a decode is a sequence with
one new token, a prefill chunk one with several. Attention picks its kernel from ``max_seqlen_q``
(1: every sequence decodes), and the LM head computes logits only at ``logits_indices``.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Context:
    cu_seqlens_q: torch.Tensor | None = None  # [num_seqs + 1] int32, offsets of each sequence's new tokens
    max_seqlen_q: int = 1  # the most new tokens of one sequence
    context_lens: torch.Tensor | None = None  # [num_seqs] int32, keys per sequence (cached + new tokens)
    max_context_len: int = 0  # an upper bound of context_lens (fixed under CUDA graphs)
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor | None = None  # [num_new_tokens] int64, each one's cache slot (-1: none)
    logits_indices: torch.Tensor | None = None  # [num_sampling_seqs] int64 hidden rows; None: all
    # In a step that also prefills: how many sequences at the front of the batch have one new token
    # (decodes). A backend may run them through its decode kernel and only the rest through prefill.
    num_decodes: int = 0
    # [2, D] int32: the decode rows (all rows of a decode step, the leading ``num_decodes`` of a
    # mixed one) longest context first, and below them their context lengths. The decode kernel
    # takes its rows in this order, so the long ones do not start last and run on alone
    # (kernels/decode_attention.py). None (small batches, see utils/buckets.py): row order.
    decode_order: torch.Tensor | None = None

    @property
    def is_decode_only(self) -> bool:
        return self.max_seqlen_q == 1


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
