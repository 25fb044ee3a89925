"""One step's model inputs, packed on the host and copied to the device in two transfers.

Every integer the forward needs goes into one int64 and one int32 host buffer, laid out as::

    int64: input_ids[T] | positions[T] | slot_mapping[T] | logits_indices[S] | fix_at[F] | fix_from[F]
    int32: cu_seqlens_q[B + 1] | context_lens[B] | decode_order[2, D] | block_tables[B, W]

(T new tokens, B sequences, S of them sampling, F placeholder inputs, D decodes given an order, else
0, W = blocks of the longest sequence the engine allows). On a GPU the buffers are pinned and
reused, two sets used in turn: with async scheduling step N+1 is packed while step N's copies may
still be queued behind step N-1.

A *placeholder* input is a token sampled by the previous step whose value the host does not know
yet (async scheduling). It is packed as 0 and patched on the device:
``input_ids[fix_at] = previous_sampled[fix_from]``.
"""

import math

import numpy as np
import torch

from nanovllm.engine.step import SchedulerOutput
from nanovllm.utils.buckets import orders_decode
from nanovllm.utils.context import Context


class InputBatch:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int, device):
        self.device = device
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.width = math.ceil(max_model_len / block_size)  # block-table columns
        pin = device.type == "cuda"
        n64 = 3 * max_num_tokens + 3 * max_num_seqs
        n32 = 4 * max_num_seqs + 1 + max_num_seqs * self.width
        self._sets = [
            (
                torch.zeros(n64, dtype=torch.int64, pin_memory=pin),
                torch.zeros(n32, dtype=torch.int32, pin_memory=pin),
            )
            for _ in range(2)
        ]
        self._turn = 0

    def build(
        self, sched: SchedulerOutput, seqs: dict, prev_rows: dict[int, int], pad_context_to: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, Context, list[int], tuple[torch.Tensor, torch.Tensor] | None]:
        """Inputs of one step from the runner's per-sequence state ``seqs``.

        ``prev_rows`` maps a sequence to its row in the previous step's sampled tokens (for
        placeholders). ``pad_context_to``: the context bound decode steps give the attention kernel
        (``max_model_len`` on a GPU, as the CUDA graphs do), None for the batch's own maximum.
        Returns input ids, positions, the attention context, the ids of the sequences that sample
        (in logits-row order) and the placeholder patch (``fix_at``, ``fix_from``) or None."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        fix_at: list[int] = []
        fix_from: list[int] = []
        cu, context_lens, logits_indices, sample_ids, tables = [0], [], [], [], []
        num_decodes = 0  # the leading run of one-token sequences
        for seq_id, n in sched.num_scheduled_tokens.items():
            state = seqs[seq_id]
            start = state.num_computed_tokens
            end, table, tokens = start + n, state.block_table, state.token_ids
            if n == 1:
                if num_decodes == len(tables):
                    num_decodes += 1
                if start < len(tokens):
                    ids.append(tokens[start])
                else:  # sampled by the previous step, still on the device
                    fix_at.append(len(ids))
                    fix_from.append(prev_rows[seq_id])
                    ids.append(0)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids += tokens[start:end]
                positions += range(start, end)
                for i in range(start // bs, (end - 1) // bs + 1):
                    base = table[i] * bs - i * bs
                    slots += range(base + max(start, i * bs), base + min(end, (i + 1) * bs))
            cu.append(cu[-1] + n)
            context_lens.append(end)
            tables.append(table)
            if end >= state.num_tokens:
                logits_indices.append(cu[-1] - 1)
                sample_ids.append(seq_id)

        t, b, s, f, w = len(ids), len(tables), len(logits_indices), len(fix_at), self.width
        h64, h32 = self._sets[self._turn]
        self._turn ^= 1
        a64, a32 = h64.numpy(), h32.numpy()
        a64[:t], a64[t : 2 * t], a64[2 * t : 3 * t] = ids, positions, slots
        o = 3 * t
        a64[o : o + s] = logits_indices
        a64[o + s : o + s + f], a64[o + s + f : o + s + 2 * f] = fix_at, fix_from
        a32[: b + 1], a32[b + 1 : 2 * b + 1] = cu, context_lens
        max_seqlen_q = max(sched.num_scheduled_tokens.values())
        d = b if max_seqlen_q == 1 else num_decodes
        d = d if orders_decode(d) else 0
        if d:  # longest context first (stable: ties keep row order), then those rows' lengths
            lens = a32[b + 1 : b + 1 + d]
            order = np.argsort(-lens, kind="stable")
            a32[2 * b + 1 : 2 * b + 1 + d], a32[2 * b + 1 + d : 2 * b + 1 + 2 * d] = order, lens[order]
        o32 = 2 * b + 1 + 2 * d
        bt = a32[o32 : o32 + b * w].reshape(b, w)
        bt.fill(0)  # entries past a sequence's blocks: block 0 (references read whole rows)
        for row, table in zip(bt, tables, strict=True):
            row[: len(table)] = table
        d64 = self._to_device(h64[: o + s + 2 * f])
        d32 = self._to_device(h32[: o32 + b * w])

        context = Context(
            cu_seqlens_q=d32[: b + 1],
            max_seqlen_q=max_seqlen_q,
            context_lens=d32[b + 1 : 2 * b + 1],
            max_context_len=pad_context_to if max_seqlen_q == 1 and pad_context_to else max(context_lens),
            block_tables=d32[o32:].view(b, w),
            slot_mapping=d64[2 * t : 3 * t],
            logits_indices=None if s == t else d64[o : o + s],
            num_decodes=0 if max_seqlen_q == 1 else num_decodes,
            decode_order=d32[2 * b + 1 : o32].view(2, d) if d else None,
        )
        fix = (d64[o + s : o + s + f], d64[o + s + f :]) if f else None
        return d64[:t], d64[t : 2 * t], context, sample_ids, fix

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return host.to(self.device, non_blocking=True)
        return host.clone()  # the host buffer is reused two steps later; the CPU forward is long done
