"""Per-step sampling inputs: the running sequences' ``SamplingParams`` as device tensors."""

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch

from nanovllm.sampling_params import SamplingParams


class SamplingRow(Protocol):
    """What the sampler reads of one sequence (the model runner's per-sequence state)."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    num_completion_tokens: int


@dataclass
class SamplingMetadata:
    """What the sampler needs for one step, one row per running sequence.

    Optional tensors are None when no row of the batch uses that option; the ``no_*`` /
    ``all_greedy`` flags are computed on the host so the sampler can skip whole steps without a
    device sync. Greedy rows carry neutral values (temperature 1, filters off) in every tensor
    except the penalties, which vLLM applies before the greedy argmax.
    """

    temperatures: torch.Tensor  # [batch] float32; 1.0 on greedy rows
    greedy_mask: torch.Tensor | None  # [batch] bool; None unless some (not all) rows are greedy
    top_k: torch.Tensor | None  # [batch] int64 in [1, vocab]; vocab where off
    top_p: torch.Tensor | None  # [batch] float32; 1.0 where off
    min_p: torch.Tensor | None  # [batch] float32; 0.0 where off
    presence_penalties: torch.Tensor | None  # [batch] float32
    frequency_penalties: torch.Tensor | None  # [batch] float32
    repetition_penalties: torch.Tensor | None  # [batch] float32
    prompt_token_mask: torch.Tensor | None  # [batch, vocab] bool: token occurs in the prompt
    output_token_counts: torch.Tensor | None  # [batch, vocab] int32: occurrences in the output
    seeded_rows: torch.Tensor | None  # [num_seeded] int64 row indices
    seeds: torch.Tensor | None  # [num_seeded, 2] int64: low and high 32 bits of the seed
    steps: torch.Tensor | None  # [num_seeded] int64: tokens generated so far
    min_tokens_rows: torch.Tensor | None  # [k] int64 } logits[rows[i], token_ids[i]] = -inf:
    min_tokens_token_ids: torch.Tensor | None  # [k] int64 } EOS / stop ids before min_tokens
    num_logprobs: list[int | None]  # per row, as requested
    max_num_logprobs: int | None  # None when no row asks for logprobs
    max_top_k: int  # largest top-k among rows that use it (0 when none)
    all_greedy: bool
    any_greedy: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool

    @property
    def plain(self) -> bool:
        """Only temperature (or greedy) sampling: no logprobs, min_tokens, penalties, filters or seeds."""
        return (
            self.max_num_logprobs is None
            and self.min_tokens_rows is None
            and self.seeded_rows is None
            and self.no_penalties
            and self.no_top_k
            and self.no_top_p
            and self.no_min_p
        )

    @classmethod
    def build(
        cls,
        seqs: Seq[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: int | Seq[int] | None = None,
    ) -> "SamplingMetadata":
        """Gather ``seqs`` (in logits-row order) into tensors on ``device``.

        Call before appending the token sampled this step: ``num_completion_tokens`` is the
        seeded RNG's step counter and decides whether ``min_tokens`` still holds EOS back.
        ``eos_token_ids`` are the model's end-of-sequence ids (``generation_config`` may list
        several); rows with ``ignore_eos`` do not have them suppressed.
        """
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        eos = list(eos_token_ids or [])
        params = [seq.sampling_params for seq in seqs]
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        all_greedy = all(greedy)
        any_greedy = any(greedy)
        no_top_k = all(p.top_k == 0 or p.top_k >= vocab_size for p in sampled)
        no_top_p = all(p.top_p == 1.0 for p in sampled)
        no_min_p = all(p.min_p == 0.0 for p in sampled)
        no_penalties = all(
            p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
            for p in params
        )

        # One host-to-device copy for all per-row float parameters.
        floats = torch.tensor(
            [
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)],
                [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.repetition_penalty for p in params],
            ],
            dtype=torch.float32,
        ).to(device, non_blocking=True)
        temperatures, top_p, min_p, presence, frequency, repetition = floats.unbind(0)
        top_k = max_top_k = None
        if not no_top_k:
            ks = [
                vocab_size if g or p.top_k == 0 else min(p.top_k, vocab_size)
                for p, g in zip(params, greedy, strict=True)
            ]
            max_top_k = max(k for k in ks if k < vocab_size)
            top_k = torch.tensor(ks, dtype=torch.int64).to(device, non_blocking=True)

        prompt_mask = counts = None
        if not no_penalties:
            prompt_mask, counts = _token_occurrences(seqs, vocab_size, device)

        seeded = [
            i for i, (p, g) in enumerate(zip(params, greedy, strict=True)) if not g and p.seed is not None
        ]
        seeded_rows = seeds = steps = None
        if seeded:
            keys = [params[i].seed & 0xFFFFFFFFFFFFFFFF for i in seeded]
            host = torch.tensor(
                [
                    [i, k & 0xFFFFFFFF, k >> 32, seqs[i].num_completion_tokens]
                    for i, k in zip(seeded, keys, strict=True)
                ],
                dtype=torch.int64,
            ).to(device, non_blocking=True)
            seeded_rows, seeds, steps = host[:, 0], host[:, 1:3], host[:, 3]

        min_rows, min_ids = [], []
        for i, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            if seq.num_completion_tokens < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
                ids = sorted(t for t in ids if t < vocab_size)
                min_rows += [i] * len(ids)
                min_ids += ids
        min_tokens_rows = min_tokens_token_ids = None
        if min_rows:
            pairs = torch.tensor([min_rows, min_ids], dtype=torch.int64).to(device, non_blocking=True)
            min_tokens_rows, min_tokens_token_ids = pairs[0], pairs[1]

        num_logprobs = [p.logprobs for p in params]
        asked = [n for n in num_logprobs if n is not None]
        return cls(
            temperatures=temperatures,
            greedy_mask=torch.tensor(greedy).to(device) if any_greedy and not all_greedy else None,
            top_k=top_k,
            top_p=None if no_top_p else top_p,
            min_p=None if no_min_p else min_p,
            presence_penalties=None if no_penalties else presence,
            frequency_penalties=None if no_penalties else frequency,
            repetition_penalties=None if no_penalties else repetition,
            prompt_token_mask=prompt_mask,
            output_token_counts=counts,
            seeded_rows=seeded_rows,
            seeds=seeds,
            steps=steps,
            min_tokens_rows=min_tokens_rows,
            min_tokens_token_ids=min_tokens_token_ids,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
            max_top_k=max_top_k or 0,
            all_greedy=all_greedy,
            any_greedy=any_greedy,
            no_penalties=no_penalties,
            no_top_k=no_top_k,
            no_top_p=no_top_p,
            no_min_p=no_min_p,
        )


def _token_occurrences(
    seqs: Seq[SamplingRow], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-occurrence mask ``[batch, vocab]`` bool and output counts ``[batch, vocab]`` int32.

    Token ids of all rows travel as one flat tensor; each lands at ``row * vocab + token`` of a
    flattened ``[batch * vocab]`` buffer (one ``index_put_`` / ``index_add_`` each).
    """
    batch = len(seqs)
    prompt_ids: list[int] = []
    prompt_lens: list[int] = []
    output_ids: list[int] = []
    output_lens: list[int] = []
    for seq in seqs:
        prompt, output = seq.prompt_token_ids, seq.completion_token_ids
        prompt_ids += prompt
        prompt_lens.append(len(prompt))
        output_ids += output
        output_lens.append(len(output))
    host = torch.tensor(prompt_ids + output_ids + prompt_lens + output_lens, dtype=torch.int64)
    flat = host.to(device, non_blocking=True)
    p, o = len(prompt_ids), len(output_ids)
    rows = torch.arange(batch, device=flat.device, dtype=torch.int64)
    prompt_rows = rows.repeat_interleave(flat[p + o : p + o + batch], output_size=p)
    output_rows = rows.repeat_interleave(flat[p + o + batch :], output_size=o)

    prompt_mask = torch.zeros(batch * vocab_size, dtype=torch.bool, device=flat.device)
    prompt_mask[prompt_rows * vocab_size + flat[:p]] = True
    counts = torch.zeros(batch * vocab_size, dtype=torch.int32, device=flat.device)
    counts.index_add_(
        0, output_rows * vocab_size + flat[p : p + o], torch.ones(o, dtype=torch.int32, device=flat.device)
    )
    return prompt_mask.view(batch, vocab_size), counts.view(batch, vocab_size)
