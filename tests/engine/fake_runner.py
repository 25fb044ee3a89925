"""A scripted model runner for engine-loop tests: no model, but a KV cache it really checks.

It mirrors the runner's contract (engine/step.py): keeps each sequence's tokens and block table from
the ``SchedulerOutput`` deltas, "writes" each new token into its cache slot, and before sampling
reads every position of the sequence back through the block table. A wrong block table, a prefix
hit on a block with other content, or a chunk computed twice or skipped fails loudly. The sampled
token is a fixed function of the whole sequence, so outputs do not depend on batching or chunking
(unless ``script`` says what to sample).
"""

import zlib

from nanovllm.engine.step import ModelRunnerOutput, SchedulerOutput


def next_token(token_ids: list[int], vocab: int) -> int:
    return zlib.crc32(bytes(str(token_ids), "ascii")) % vocab


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab: int = 384, script=None):
        self.num_blocks, self.block_size, self.vocab = num_blocks, block_size, vocab
        self.script = script  # optional: fn(seq_id, token_ids) -> token id
        self.seqs: dict[int, dict] = {}
        self.cache: dict[int, tuple[int, int]] = {}  # slot -> (position, token) written there
        self.steps: list[SchedulerOutput] = []
        self.fail_next: BaseException | None = None
        self.closed = False

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(sched)
        for seq_id in sched.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in sched.new_seqs:
            self.seqs[new.seq_id] = {
                "tokens": list(new.token_ids),
                "blocks": list(new.block_ids),
                "computed": new.num_computed_tokens,
            }
        c = sched.cached_seqs
        for seq_id, toks, blocks, computed in zip(
            c.seq_ids, c.new_token_ids, c.new_block_ids, c.num_computed_tokens, strict=True
        ):
            s = self.seqs[seq_id]
            s["tokens"] += toks
            s["blocks"] += blocks
            assert s["computed"] <= computed, "num_computed_tokens went backwards"
            s["computed"] = computed
        if self.fail_next is not None:  # after applying the deltas, as a real forward would fail
            e, self.fail_next = self.fail_next, None
            raise e
        bs = self.block_size
        sampled_ids, tokens = [], []
        for seq_id, n in sched.num_scheduled_tokens.items():
            s = self.seqs[seq_id]
            start, end = s["computed"], s["computed"] + n
            assert n >= 1 and end <= len(s["tokens"]), (
                f"seq {seq_id}: computes {start}..{end} of {len(s['tokens'])}"
            )
            assert len(s["blocks"]) * bs >= end, f"seq {seq_id}: {end} tokens in {len(s['blocks'])} blocks"
            for p in range(start, end):
                self.cache[s["blocks"][p // bs] * bs + p % bs] = (p, s["tokens"][p])
            if end == len(s["tokens"]):
                for p in range(end):  # attention reads every earlier position through the block table
                    got = self.cache.get(s["blocks"][p // bs] * bs + p % bs)
                    assert got == (p, s["tokens"][p]), f"seq {seq_id}: position {p} reads {got}"
                sampled_ids.append(seq_id)
                script = self.script
                tokens.append(script(seq_id, s["tokens"]) if script else next_token(s["tokens"], self.vocab))
        return ModelRunnerOutput(sampled_ids, tokens)

    def shutdown(self) -> None:
        self.closed = True
