"""Continuous batching with one token budget per step. Pure Python: no torch.

Each step has ``max_num_batched_tokens`` tokens to give out:

1. Running sequences first, in admission order: one token each when decoding, the next chunk of
   the prompt when still in prefill (as much as the budget left allows).
2. Then waiting sequences, in arrival order, while budget, ``max_num_seqs`` and free blocks allow.
   A prompt that does not fit the rest of the budget starts with a first chunk and goes on in the
   next steps (chunked prefill). Admission stops at the first sequence that cannot go, so arrival
   order is kept; it is skipped altogether in a step that had to preempt.

So one step may hold decodes and prefill chunks together. A sequence samples a token only when the
step computes its last known token (see step.py).

Preemption by recompute. When a running sequence needs a block and none is free, the most recently
admitted running sequence (possibly in the middle of its prefill) gives all its blocks back and
returns to the *front* of the waiting queue; it is computed again later, with its generated tokens
as part of the prompt (prefix caching usually makes that cheap).

With ``enable_chunked_prefill=False`` a step is all prefill (whole prompts) or all decode, as in
the reference design: kept for comparison.
"""

from collections import deque

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.engine.step import ModelRunnerOutput, NewSeq, SchedulerOutput


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
        enable_chunked_prefill: bool = True,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self._runner_holds: set[int] = set()  # seq ids whose state the runners keep
        self._forget: list[int] = []  # seq ids the runners must drop at the next step
        self._forget_unconfirmed: list[int] = []  # sent with steps that have not finished yet

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # ---- schedule ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        if not self.enable_chunked_prefill:
            scheduled = self._admit(budget, True, [])
            if not scheduled:
                self._schedule_running(budget, scheduled)
            return self._output(scheduled)
        budget, preempted = self._schedule_running(budget, scheduled)
        if not preempted:
            scheduled += self._admit(budget, False, scheduled)
        return self._output(scheduled)

    def _schedule_running(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens_to_schedule, budget)
            if n <= 0:  # not expected (a placeholder always leaves one token): a guard, not a path
                i += 1
                continue
            while not self.block_manager.allocate_slots(seq, n):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return budget, preempted
            scheduled.append((seq, n))
            budget -= n
            i += 1
        return budget, preempted

    def _admit(
        self, budget: int, whole_prompts: bool, scheduled: list[tuple[Sequence, int]]
    ) -> list[tuple[Sequence, int]]:
        admitted: list[tuple[Sequence, int]] = []
        if not self.waiting:
            return admitted
        pending: set[int] = set()  # hashes of the full blocks this step computes
        for seq, n in scheduled:
            self._add_pending(seq, n, pending)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.get_computed_blocks(seq)
            hashes = seq.block_hashes
            if len(hits) < len(hashes) and hashes[len(hits)] in pending:
                break  # its next block is being computed right now: hit it next step instead
            remaining = seq.num_tokens - len(hits) * self.block_size
            if whole_prompts and remaining > budget:
                break
            n = min(remaining, budget)
            if not self.block_manager.allocate_slots(seq, n, hits):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.num_prompt_cached_tokens is None:
                seq.num_prompt_cached_tokens = seq.num_computed_tokens
            self.running.append(seq)
            admitted.append((seq, n))
            self._add_pending(seq, n, pending)
            budget -= n
        return admitted

    def _add_pending(self, seq: Sequence, n: int, pending: set[int]) -> None:
        """Add the hashes of the full blocks that steps in flight and this one (``n`` tokens)
        compute for ``seq``: they become prefix-cache hits once those steps are done."""
        hashes = self.block_manager.block_hashes(seq)
        first = seq.num_computed_tokens // self.block_size
        end = (seq.num_computed_tokens + seq.num_inflight_tokens + n) // self.block_size
        pending.update(hashes[first:end])

    def _preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self._drop_from_runner(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _output(self, scheduled: list[tuple[Sequence, int]]) -> SchedulerOutput:
        """Describe the step to the runners and mark its tokens as in flight (``update`` confirms
        them; a failed step's are dropped by ``runners_lost_state``)."""
        out = SchedulerOutput(finished_seq_ids=self._forget)
        if scheduled:  # an empty step never runs: keep them for the next one
            self._forget_unconfirmed += self._forget  # sent again if this step fails
            self._forget = []
        cached = out.cached_seqs
        for seq, n in scheduled:
            out.num_scheduled_tokens[seq.seq_id] = n
            start = seq.num_computed_tokens + seq.num_inflight_tokens
            if seq.seq_id in self._runner_holds:
                cached.seq_ids.append(seq.seq_id)
                cached.new_token_ids.append(seq.token_ids[seq.num_tokens_sent :])
                cached.new_block_ids.append(seq.block_table[seq.num_blocks_sent :])
                cached.num_computed_tokens.append(start)
            else:
                self._runner_holds.add(seq.seq_id)
                out.new_seqs.append(
                    NewSeq(
                        seq.seq_id,
                        list(seq.token_ids),
                        seq.num_prompt_tokens,
                        list(seq.block_table),
                        start,
                        seq.sampling_params,
                    )
                )
            seq.num_tokens_sent, seq.num_blocks_sent = seq.num_tokens, len(seq.block_table)
            if start + n == seq.num_tokens + seq.num_placeholders:  # computes its last token: samples
                seq.num_placeholders += 1
            seq.num_inflight_tokens += n
        return out

    # ---- after the step --------------------------------------------------------------------

    def update(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[tuple[Sequence, int]]:
        """Confirm a finished step: advance every scheduled sequence by its computed tokens,
        register the blocks that are now full and computed, append the sampled tokens and finish
        sequences that are done. With async scheduling the next step is already in flight; a
        sequence finished here computes one token too many there, which is dropped.

        Returns (sequence, row in ``runner_output``) for every sequence that got a token."""
        del self._forget_unconfirmed[: len(output.finished_seq_ids)]  # the runners have dropped these
        seqs = self._seqs_by_id(output)
        for seq_id, n in output.num_scheduled_tokens.items():
            seq = seqs.get(seq_id)
            if seq is None:  # finished (aborted) after it was scheduled
                continue
            seq.num_computed_tokens += n
            seq.num_inflight_tokens -= n
            self.block_manager.cache_computed_blocks(seq)
        sampled = []
        pairs = zip(runner_output.seq_ids, runner_output.sampled_token_ids, strict=True)
        for row, (seq_id, token_id) in enumerate(pairs):
            seq = seqs.get(seq_id)
            if seq is None:  # finished or preempted after it was scheduled: the token is dropped
                continue
            seq.num_placeholders -= 1
            seq.append_token(token_id)
            sampled.append((seq, row))
            reason = self.finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
        return sampled

    def _seqs_by_id(self, output: SchedulerOutput) -> dict[int, Sequence]:
        ids = output.num_scheduled_tokens
        return {s.seq_id: s for s in self.running if s.seq_id in ids}

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
        """Finish a sequence (EOS, length, a stop string found by the engine, an abort): its blocks
        go back to the pool now."""
        if seq.is_finished:
            return
        was_waiting = seq.status == SequenceStatus.WAITING
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self._drop_from_runner(seq)
        if was_waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)

    def _drop_from_runner(self, seq: Sequence) -> None:
        if seq.seq_id in self._runner_holds:
            self._runner_holds.discard(seq.seq_id)
            self._forget.append(seq.seq_id)

    def runners_lost_state(self) -> None:
        """A step failed part-way: the runners may hold half-applied state. Make them drop every
        sequence and send each again in full at its next step."""
        self._forget = self._forget_unconfirmed + self._forget + list(self._runner_holds)
        self._forget_unconfirmed = []
        self._runner_holds.clear()
        for seq in self.running:  # every step in flight is dropped with the failed one
            seq.reset_inflight()
