"""Continuous batching: which sequences run in the next step. Pure Python: no torch.

Each step is either all prefill or all decode:

1. Prefill first. Admit waiting sequences in arrival order while there is room: at most
   ``max_num_seqs`` running, at most ``max_num_batched_tokens`` new (uncached) tokens in the step,
   and enough free KV blocks. Admission stops at the first sequence that does not fit, so arrival
   order is kept.
2. Otherwise decode every running sequence (one token each). If a sequence needs a new block and
   none is free, preempt by recompute: the most recently admitted running sequence gives all its
   blocks back and returns to the *front* of the waiting queue; it is prefilled again later, with
   its generated tokens as part of the prompt (prefix caching usually makes that cheap).
"""

from collections import deque
from dataclasses import dataclass

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool
    num_batched_tokens: int  # tokens the model computes this step


class Scheduler:
    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        scheduled: list[Sequence] = []
        num_batched_tokens = 0
        while self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            num_cached, num_new_blocks = self.block_manager.lookup(seq)
            num_new_tokens = seq.num_tokens - num_cached
            if num_new_blocks > self.block_manager.num_free_blocks or (
                scheduled and num_batched_tokens + num_new_tokens > self.max_num_batched_tokens
            ):
                break
            # Blocks are hashed now, before the step computes their K/V: nothing can read them
            # in between, since the step runs right after scheduling.
            self.block_manager.allocate(seq)
            num_batched_tokens += num_new_tokens
            if seq.num_prompt_cached_tokens is None:
                seq.num_prompt_cached_tokens = seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            scheduled.append(seq)
        if scheduled:
            self.running.extend(scheduled)
            return SchedulerOutput(scheduled, True, num_batched_tokens)

        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return SchedulerOutput(scheduled, False, len(scheduled))

    def _preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, output: SchedulerOutput, token_ids: list[int]) -> list[Sequence]:
        """Append one sampled token per scheduled sequence; return the ones that finished."""
        finished = []
        for seq, token_id in zip(output.seqs, token_ids, strict=True):
            seq.append_token(token_id)
            seq.num_cached_tokens = seq.num_tokens - 1
            self.block_manager.hash_full_blocks(seq)
            reason = self.finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampling_params
        if seq.num_completion_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                return "stop"
        if seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a running sequence (EOS, length, a stop string found by the engine, an abort)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
