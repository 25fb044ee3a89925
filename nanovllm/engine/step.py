"""The step contract: what crosses from the scheduler to every model runner and back. No torch.

The scheduler decides, for one step, how many new tokens each sequence computes; every rank's
runner (rank 0's and each tensor-parallel worker's) receives the same ``SchedulerOutput`` through
``execute_model`` and keeps its own copy of each sequence's tokens and block table between steps,
so a step carries only what changed::

    Scheduler.schedule() ──► SchedulerOutput ──► runner.execute_model() ──► ModelRunnerOutput
          ▲                                                                        │
          └──────────────────────── Scheduler.update() ◄───────────────────────────┘

A sequence *samples* in a step when the step computes its last known token: a prompt whose final
chunk is in this step, or a decode. A partial prefill (an earlier chunk) samples nothing.
"""

from dataclasses import dataclass, field

from nanovllm.sampling_params import SamplingParams


@dataclass
class NewSeq:
    """A sequence the runner does not hold: first admission, or re-admission after a preemption
    (then ``token_ids`` includes the tokens generated before it)."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits: K/V already in the cache
    sampling_params: SamplingParams


@dataclass
class CachedSeqs:
    """Scheduled sequences the runner already holds, as columns (one entry per sequence)."""

    seq_ids: list[int] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)  # appended since the runner last saw it
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to its block table since then
    num_computed_tokens: list[int] = field(default_factory=list)  # K/V in the cache before this step


@dataclass
class SchedulerOutput:
    new_seqs: list[NewSeq] = field(default_factory=list)
    cached_seqs: CachedSeqs = field(default_factory=CachedSeqs)
    # seq_id -> tokens to compute this step, for every scheduled sequence. Insertion order is the
    # batch order: the forward packs each sequence's new tokens in this order.
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    # Sequences the runner must forget before this step (finished, aborted or preempted).
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class ModelRunnerOutput:
    """One token per sampling sequence, in batch order (only rank 0 samples; workers return None)."""

    seq_ids: list[int]
    sampled_token_ids: list[int]
    # Per sampled sequence: None if it did not ask, else {token id: logprob} (top-N, then the sample).
    logprobs: list[dict[int, float] | None] | None = None


EMPTY_OUTPUT = ModelRunnerOutput([], [])
