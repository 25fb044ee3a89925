"""Small builders for scheduler tests: real Scheduler, real Sequences, no model."""

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

EOS = 2


def make_scheduler(
    num_blocks=8, block_size=16, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=128
):
    return Scheduler(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        block_size=block_size,
        eos_token_ids={EOS},
    )


def make_seq(tokens, block_size=16, max_tokens=8, ignore_eos=False):
    if isinstance(tokens, int):
        tokens = [10 + i % 50 for i in range(tokens)]
    return Sequence(
        tokens, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos), block_size
    )
