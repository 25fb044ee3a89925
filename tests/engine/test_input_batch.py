"""InputBatch packs a step's inputs; here: the count of leading decodes that attention may split off."""

import torch

from nanovllm.engine.input_batch import InputBatch
from nanovllm.engine.model_runner import SeqState
from nanovllm.engine.step import NewSeq, SchedulerOutput
from nanovllm.sampling_params import SamplingParams


def state(seq_id: int, num_tokens: int, num_computed: int) -> SeqState:
    s = SeqState(
        NewSeq(seq_id, list(range(num_tokens)), num_tokens, [seq_id], num_computed, SamplingParams())
    )
    return s


def build(scheduled: dict[int, int], seqs: dict[int, SeqState]):
    batch = InputBatch(64, 8, 64, 16, torch.device("cpu"))
    return batch.build(SchedulerOutput(num_scheduled_tokens=scheduled), seqs, {}, None)[2]


def test_num_decodes_counts_only_the_leading_one_token_sequences():
    # two decodes, a prefill chunk, then a one-token last chunk: only the first two are decodes
    seqs = {0: state(0, 9, 8), 1: state(1, 5, 4), 2: state(2, 12, 2), 3: state(3, 7, 6)}
    ctx = build({0: 1, 1: 1, 2: 10, 3: 1}, seqs)
    assert ctx.num_decodes == 2 and ctx.max_seqlen_q == 10
    assert ctx.cu_seqlens_q.tolist() == [0, 1, 2, 12, 13]


def test_num_decodes_is_zero_when_the_step_starts_with_a_prefill_or_only_decodes():
    seqs = {0: state(0, 9, 0), 1: state(1, 5, 4)}
    assert build({0: 9, 1: 1}, seqs).num_decodes == 0
    assert build({1: 1}, {1: state(1, 5, 4)}).num_decodes == 0  # decode-only: the decode kernel anyway


def test_decode_order_is_the_decodes_longest_context_first():
    """The decode kernel takes its rows in ``decode_order``: every decode row once, longest context
    first (ties in row order); a mixed step's order covers its leading decodes only."""
    seqs = {0: state(0, 9, 8), 1: state(1, 15, 14), 2: state(2, 5, 4), 3: state(3, 15, 14)}
    ctx = build({0: 1, 1: 1, 2: 1, 3: 1}, seqs)
    assert ctx.decode_order.tolist() == [1, 3, 0, 2]
    assert ctx.block_tables[:, 0].tolist() == [0, 1, 2, 3]  # packed after the order, unchanged by it
    mixed = {0: state(0, 9, 8), 1: state(1, 15, 14), 2: state(2, 12, 2)}
    ctx = build({0: 1, 1: 1, 2: 10}, mixed)
    assert ctx.decode_order.tolist() == [1, 0] and ctx.context_lens.tolist() == [9, 15, 12]
    assert build({2: 10}, {2: state(2, 12, 2)}).decode_order is None
