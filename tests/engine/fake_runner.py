"""A scripted model runner for engine-loop tests: no model, but a KV cache it really checks.

It mirrors the runner's contract (engine/step.py): keeps each sequence's tokens and block table from
the ``SchedulerOutput`` deltas, "writes" each new token into its cache slot, and before sampling
reads every position of the sequence back through the block table. A wrong block table, a prefix
hit on a block with other content, or a chunk computed twice or skipped fails loudly. The sampled
token is a fixed function of the whole sequence, so outputs do not depend on batching or chunking
(unless ``script`` says what to sample).

Like the real runner it keeps the tokens it sampled as placeholders until the scheduler sends their
values back, and feeds them to the next step itself (async scheduling); the values sent back must
equal what it sampled.
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

    def execute_model_async(self, sched: SchedulerOutput) -> "Done":
        return Done(self.execute_model(sched))

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(sched)
        for seq_id in sched.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in sched.new_seqs:
            self.seqs[new.seq_id] = {
                "tokens": list(new.token_ids),
                "blocks": list(new.block_ids),
                "computed": new.num_computed_tokens,
                "pending": [],  # sampled here, values not sent back yet
            }
        c = sched.cached_seqs
        for seq_id, toks, blocks, computed in zip(
            c.seq_ids, c.new_token_ids, c.new_block_ids, c.num_computed_tokens, strict=True
        ):
            s = self.seqs[seq_id]
            assert toks == s["pending"][: len(toks)], f"seq {seq_id}: sent {toks}, sampled {s['pending']}"
            del s["pending"][: len(toks)]
            s["tokens"] += toks
            s["blocks"] += blocks
            assert s["computed"] == computed, f"seq {seq_id}: resumes at {computed}, computed {s['computed']}"
            s["computed"] = computed
        if self.fail_next is not None:  # after applying the deltas, as a real forward would fail
            e, self.fail_next = self.fail_next, None
            raise e
        bs = self.block_size
        sampled_ids, tokens = [], []
        for seq_id, n in sched.num_scheduled_tokens.items():
            s = self.seqs[seq_id]
            known = s["tokens"] + s["pending"]
            start, end = s["computed"], s["computed"] + n
            assert n >= 1 and end <= len(known), f"seq {seq_id}: computes {start}..{end} of {len(known)}"
            assert len(s["pending"]) <= 1, f"seq {seq_id}: {s['pending']} sampled tokens never came back"
            assert len(s["blocks"]) * bs >= end, f"seq {seq_id}: {end} tokens in {len(s['blocks'])} blocks"
            for p in range(start, end):
                self.cache[s["blocks"][p // bs] * bs + p % bs] = (p, known[p])
            s["computed"] = end
            if end == len(known):
                for p in range(end):  # attention reads every earlier position through the block table
                    got = self.cache.get(s["blocks"][p // bs] * bs + p % bs)
                    assert got == (p, known[p]), f"seq {seq_id}: position {p} reads {got}"
                sampled_ids.append(seq_id)
                script = self.script
                token = script(seq_id, known) if script else next_token(known, self.vocab)
                s["pending"].append(token)
                tokens.append(token)
        return ModelRunnerOutput(sampled_ids, tokens)

    def shutdown(self) -> None:
        self.closed = True


class Done:
    """The handle of a step that has already run (a fake runner computes while it launches)."""

    def __init__(self, output: ModelRunnerOutput):
        self.output = output

    def get(self) -> ModelRunnerOutput:
        return self.output
