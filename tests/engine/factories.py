"""Small builders for scheduler tests: real Scheduler, real Sequences, no model."""

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner

EOS = 2


def make_scheduler(
    num_blocks=8,
    block_size=16,
    max_num_seqs=4,
    max_num_batched_tokens=256,
    max_model_len=128,
    enable_chunked_prefill=True,
):
    return Scheduler(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        block_size=block_size,
        eos_token_ids={EOS},
        enable_chunked_prefill=enable_chunked_prefill,
    )


def make_seq(tokens, block_size=16, max_tokens=8, ignore_eos=False):
    if isinstance(tokens, int):
        tokens = [10 + i % 50 for i in range(tokens)]
    return Sequence(
        tokens, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos), block_size
    )


def run_step(sched: Scheduler, runner: FakeRunner | None = None, token: int = 7):
    """One step against a fake runner (every sampled token is ``token`` unless the runner scripts
    one); checks the block manager's invariants afterwards. Returns (output, sampled seqs)."""
    if runner is None:  # one runner per scheduler: it keeps state between steps
        runner = sched.__dict__.setdefault(
            "fake_runner", FakeRunner(sched.block_manager.num_blocks, sched.block_size)
        )
        runner.script = lambda *_: token
    out = sched.schedule()
    assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
    result = runner.execute_model(out)
    sampled = [seq for seq, _ in sched.update(out, result)]
    sched.block_manager.check_integrity(sched.running)
    return out, sampled
