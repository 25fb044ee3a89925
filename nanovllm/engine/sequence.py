"""One sequence's tokens and bookkeeping. Pure Python: no torch."""

from copy import copy
from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class TokenCounts:
    """Prompt / completion views over ``token_ids`` (first ``num_prompt_tokens`` are the prompt),
    shared by the scheduler's ``Sequence`` and the runner's per-sequence state."""

    __slots__ = ()
    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


class Sequence(TokenCounts):
    """A prompt plus the tokens generated for it so far.

    ``block_table`` lists the KV-cache blocks holding this sequence's tokens in order;
    ``num_computed_tokens`` counts the leading tokens whose K/V are in those blocks (prefix-cache
    hits at admission, then every token a finished step has computed). A running sequence always
    has at least one token to compute: the rest of its prompt, or the token sampled last.

    With async scheduling the next step is scheduled while the current one still runs, so two
    counters describe the steps in flight: ``num_inflight_tokens`` are scheduled but not yet
    confirmed, and ``num_placeholders`` are sampled tokens whose values are still on the GPU (the
    runner feeds them to the next step itself). Positions::

        [0, num_computed)                      K/V in the cache
        [num_computed, + num_inflight)         being computed by steps in flight
        [num_tokens, + num_placeholders)       sampled by steps in flight, values unknown here
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = copy(sampling_params)
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_inflight_tokens = 0
        self.num_placeholders = 0
        self.num_cached_blocks = 0  # leading blocks cache_computed_blocks has registered
        self.block_hashes: list[int] = []  # chained hashes of the full blocks (block_manager fills it)
        # Prompt tokens served from the prefix cache at the first admission (reported to the user).
        self.num_prompt_cached_tokens: int | None = None
        self.finish_reason: str | None = None
        # What the model runner holds of this sequence (the scheduler's bookkeeping).
        self.num_tokens_sent = 0
        self.num_blocks_sent = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_tokens_to_schedule(self) -> int:
        """Tokens no step has been given yet (a placeholder counts: the runner knows its value)."""
        return self.num_tokens + self.num_placeholders - self.num_computed_tokens - self.num_inflight_tokens

    def reset_inflight(self) -> None:
        self.num_inflight_tokens = self.num_placeholders = 0

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block(self, i: int) -> list[int]:
        """Token ids of logical block ``i``."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
