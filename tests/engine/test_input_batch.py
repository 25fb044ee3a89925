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
    batch = InputBatch(64, 16, 64, 16, torch.device("cpu"))
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
    """The decode kernel takes its rows in ``decode_order`` (from 9 rows on, the 16-row bucket): every
    decode row once, longest context first (ties in row order), then those rows' lengths; a mixed
    step's order covers its leading decodes only."""
    lens = [9, 15, 5, 15, 2, 3, 4, 6, 7, 8]
    seqs = {i: state(i, n, n - 1) for i, n in enumerate(lens)}
    ctx = build(dict.fromkeys(seqs, 1), seqs)
    order = [1, 3, 0, 9, 8, 7, 2, 6, 5, 4]
    assert ctx.decode_order.tolist() == [order, [lens[i] for i in order]]
    assert ctx.block_tables[:, 0].tolist() == list(range(10))  # packed after the order, unchanged by it
    assert build(dict.fromkeys(range(8), 1), seqs).decode_order is None  # 8 rows: row order
    seqs[10] = state(10, 12, 2)
    ctx = build(dict.fromkeys(seqs, 1) | {10: 10}, seqs)
    assert ctx.decode_order.tolist() == [order, [lens[i] for i in order]] and ctx.num_decodes == 10
